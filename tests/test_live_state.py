"""Issue 14 item 6, the live-state glitches, each reproduced first: the sidebar's "7 of 6 steps
recorded" after a live run with pathway, a finished step's progress shown during the next
step, "None" in numeric cells, log lines without the interpreter, defunct job processes."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

from engine import schema
from explorer import jobs, views
from explorer.widgets import recorded_steps

from tests.test_explorer_jobs import make_job, start_runner, wait_state


def test_partial_runs_are_not_counted_as_pipeline_steps():
    done = {"status": "done"}
    steps = {s: dict(done) for s in schema.STEPS}
    steps["pathways[features]"] = dict(done)  # what a live job with pathway records
    steps["pathways[0/2]"] = dict(done)
    assert len([v for v in steps.values() if v["status"] == "done"]) == 8  # what the sidebar used to count
    assert recorded_steps(steps) == 6
    steps["tokens"] = {"status": "failed"}
    steps["integrate"] = "not a record"
    assert recorded_steps(steps) == 4


def test_each_step_shows_only_its_own_progress_and_the_log_names_the_interpreter(tmp_path):
    writer = ("import json, sys, time; json.dump({'stage': 'prototype L1-2', 'done': 5, 'total': 5, "
              "'updated': time.time()}, open(sys.argv[1], 'w'))")
    folder = tmp_path / "jobs" / "L1-2-two"
    first = [sys.executable, "-c", writer, str(folder / schema.JOB_PROGRESS)]
    second = [sys.executable, "-c", "import time; print('second', flush=True); time.sleep(30)"]
    make_job(folder, [first, second])
    proc = start_runner(folder)
    try:
        end = time.time() + 30
        st = jobs.read_job(folder)
        while time.time() < end and not (st.step_index == 1 and "second" in jobs.log_tail(folder)):
            time.sleep(0.05)
            st = jobs.read_job(folder)
        assert st.step_index == 1 and st.state == "running"
        # the first step's "5/5" is not the second step's progress
        assert (st.stage, st.done, st.total) == (None, None, None)
        assert st.fraction == 0.5
        log = jobs.log_tail(folder, 50).splitlines()
        assert f"$ {shlex.join(first)}" in log and f"$ {shlex.join(second)}" in log
        assert all(line.startswith(f"$ {shlex.quote(sys.executable)} -c ") for line in log if line.startswith("$"))
        # a progress file written during this step is shown
        (folder / schema.JOB_PROGRESS).write_text(json.dumps({"stage": "pathways", "done": 1, "total": 4,
                                                              "updated": time.time()}))
        st = jobs.read_job(folder)
        assert (st.stage, st.done, st.total) == ("pathways", 1, 4)
        assert math.isclose(st.fraction, (1 + 1 / 4) / 2)
    finally:
        jobs.cancel_job(folder)
        proc.wait(20)


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_finished_job_processes_are_reaped(tmp_path):
    folders = [make_job(tmp_path / "jobs" / f"L1-2-r{i}", [[sys.executable, "-c", "pass"]]) for i in range(2)]
    procs = [start_runner(f) for f in folders]
    for f in folders:
        wait_state(f, ("done",))
    end = time.time() + 20
    while time.time() < end and any(_state(p.pid) != "Z" for p in procs):
        time.sleep(0.05)
    assert [_state(p.pid) for p in procs] == ["Z", "Z"]  # finished, not yet waited for: defunct
    jobs.list_jobs(tmp_path)  # what every page draw does
    assert [_state(p.pid) for p in procs] == [None, None]
    assert not any(str(f) in jobs._PROCS for f in folders)


def test_missing_numbers_are_shown_as_a_dash_not_none():
    df = pd.DataFrame({"feature": ["L1-2", "L0-3", "L0-4"], "safe": [1.23456, float("nan"), None],
                       "risky": [None, -0.5, 2.0]})
    out = views.numbers_as_text(df, {"safe": "{:.3f}", "risky": "{:+.2f}", "absent": "{:.1f}"})
    assert out["safe"].tolist() == ["1.235", "–", "–"]
    assert out["risky"].tolist() == ["–", "-0.50", "+2.00"]
    assert out["feature"].tolist() == df["feature"].tolist()
    assert not any("None" in str(v) or "nan" in str(v) for v in out.to_numpy().ravel())
