"""explorer.jobs: input checks before anything starts, the runner's states (done, failed with
the engine's one-line error, cancelled, vanished), one job per feature, saving a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import UserError
from explorer import jobs

ROOT = Path(__file__).resolve().parents[1]


def fixture_cfg(fixture_dir, tmp_path):
    from engine.config import load_config

    return load_config(fixture_dir / "config.yaml", {"cache_dir": str(tmp_path / "cache")})


@pytest.mark.parametrize("req, message", [
    (jobs.JobRequest("L6-1"), "layer 6 is outside the model (layers 0..5)"),
    (jobs.JobRequest("L2-512"), "index 512 is outside the SAE (0..511)"),
    (jobs.JobRequest("L2_5"), "malformed feature id"),
    (jobs.JobRequest("L2-5", "custom", ""), "the custom prompt is empty"),
    (jobs.JobRequest("L2-5", "custom", "x" * 4001), "the custom prompt has 4001 characters; the limit is 4000"),
    (jobs.JobRequest("L2-5", "sideways"), "prompt must be one of"),
    (jobs.JobRequest("L2-5", device="tpu"), "device must be cpu or cuda"),
    (jobs.JobRequest("L2-5", "custom", "hello", with_pathway=True), "pathways run on the configured prompts"),
])
def test_validation(fixture_dir, tmp_path, req, message):
    cfg = fixture_cfg(fixture_dir, tmp_path)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        jobs.start_job(cfg, str(fixture_dir / "config.yaml"), cfg.cache, req)
    assert not (cfg.cache / "jobs").exists() or not any(p.is_dir() for p in (cfg.cache / "jobs").iterdir())


def test_valid_request_is_normalised(fixture_dir, tmp_path):
    cfg = fixture_cfg(fixture_dir, tmp_path)
    req = jobs.validate_request(cfg, jobs.JobRequest(" L5-511 ", "safe", "ignored", "cpu"))
    assert req == jobs.JobRequest("L5-511", "safe", None, "cpu", False)
    argv = jobs.commands("c.yaml", Path("/x"), req, Path("/x/jobs/j"))[0]["argv"]
    assert argv[1:] == ["-m", "engine", "prototype", "--config", "c.yaml", "--cache", "/x", "--device", "cpu",
                        "--progress-file", "/x/jobs/j/progress.json", "--feature", "L5-511", "--out",
                        "/x/jobs/j/result.json", "--prompt", "safe"]
    custom = jobs.JobRequest("L5-511", "custom", "Choice: ", "cpu")
    assert jobs.commands(None, Path("/x"), custom, Path("/j"))[0]["argv"][-2:] == ["--prompt-text", "Choice: "]


def make_job(folder: Path, steps: list[list[str]], feature: str = "L1-2") -> Path:
    folder.mkdir(parents=True)
    (folder / jobs.JOB_FILE).write_text(json.dumps({
        "job_id": folder.name, "feature": feature, "state": "starting", "created": time.time(), "request": {},
        "steps": [{"name": f"step{i}", "argv": a} for i, a in enumerate(steps)], "step_index": 0}))
    return folder


def start_runner(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "explorer.jobs", "run", str(folder)], cwd=str(ROOT), env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jobs._PROCS[str(folder)] = proc
    return proc


def wait_state(folder: Path, states: tuple[str, ...], timeout: float = 30) -> jobs.JobStatus:
    end = time.time() + timeout
    while time.time() < end:
        st = jobs.read_job(folder)
        if st.state in states:
            return st
        time.sleep(0.05)
    raise AssertionError(f"job stayed {jobs.read_job(folder).state}")


def test_runner_done_and_failed_with_error_line(tmp_path):
    ok = make_job(tmp_path / "jobs" / "L1-2-ok", [[sys.executable, "-c", "print('step one')"],
                                                  [sys.executable, "-c", "print('step two')"]])
    start_runner(ok).wait(30)
    st = wait_state(ok, ("done",))
    assert st.step_index == 1 and st.fraction == 1.0
    assert "step one" in jobs.log_tail(ok) and "step two" in jobs.log_tail(ok)
    bad = make_job(tmp_path / "jobs" / "L1-2-bad", [
        [sys.executable, "-c", "import sys; print('loading'); print('error: feature L1-2: layer 1 is bad', file=sys.stderr); sys.exit(2)"],
        [sys.executable, "-c", "print('never')"]])
    start_runner(bad).wait(30)
    st = wait_state(bad, ("failed",))
    assert st.error == "error: feature L1-2: layer 1 is bad"
    assert "never" not in jobs.log_tail(bad)
    assert [j.job_id for j in jobs.list_jobs(tmp_path, "L1-2")] == ["L1-2-bad", "L1-2-ok"]


def test_cancel_stops_the_engine_process(tmp_path):
    folder = make_job(tmp_path / "jobs" / "L1-2-slow", [[sys.executable, "-c",
                                                         "import time, os; print(os.getpid(), flush=True); time.sleep(60)"]])
    proc = start_runner(folder)
    wait_state(folder, ("running",))
    end = time.time() + 20
    last_line = ""
    while time.time() < end and not last_line.isdigit():  # the log is empty until the child has printed
        time.sleep(0.05)
        last_line = (jobs.log_tail(folder).splitlines() or [""])[-1].strip()
    assert last_line.isdigit(), f"the engine process never printed its pid: {jobs.log_tail(folder)!r}"
    child = int(last_line)
    assert jobs.active_job(tmp_path, "L1-2").job_id == "L1-2-slow"
    jobs.cancel_job(folder)
    proc.wait(20)
    st = wait_state(folder, ("cancelled",))
    assert st.error == "cancelled by the user"
    end = time.time() + 10
    while time.time() < end and jobs._alive(child):  # gone, or a zombie waiting for init to reap it
        time.sleep(0.05)
    assert not jobs._alive(child)
    assert jobs.active_job(tmp_path, "L1-2") is None


def test_one_job_per_feature_and_vanished_runner(fixture_dir, tmp_path):
    cfg = fixture_cfg(fixture_dir, tmp_path)
    busy = make_job(cfg.cache / "jobs" / "L2-5-busy", [], feature="L2-5")
    data = json.loads((busy / jobs.JOB_FILE).read_text())
    (busy / jobs.JOB_FILE).write_text(json.dumps({**data, "state": "running", "pid": os.getpid()}))
    with pytest.raises(UserError, match="a job for L2-5 is already running"):
        jobs.start_job(cfg, None, cfg.cache, jobs.JobRequest("L2-5", "safe"))
    # A runner that died without recording an end is reported as failed, and frees the feature.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (busy / jobs.JOB_FILE).write_text(json.dumps({**data, "state": "running", "pid": dead.pid}))
    st = jobs.read_job(busy)
    assert st.state == "failed" and "stopped unexpectedly" in st.error
    assert jobs.active_job(cfg.cache, "L2-5") is None


def test_save_result(tmp_path):
    from engine.schema import prototype_path, with_schema

    folder = make_job(tmp_path / "jobs" / "L1-2-x", [])
    (folder / "result.json").write_text(json.dumps(with_schema({"feature": "L1-2", "prompts": {}})))
    out = jobs.save_result(tmp_path, jobs.read_job(folder))
    assert out == prototype_path(tmp_path, "L1-2")
    assert json.loads(out.read_text())["feature"] == "L1-2"
    (folder / "result.json").unlink()
    with pytest.raises(UserError, match="has no result"):
        jobs.save_result(tmp_path, jobs.read_job(folder))


def _job_folder(root: Path, name: str, job: bytes, progress: bytes | None = None) -> Path:
    folder = root / "jobs" / name
    folder.mkdir(parents=True)
    (folder / "job.json").write_bytes(job)
    if progress is not None:
        (folder / "progress.json").write_bytes(progress)
    return folder


def test_damaged_job_files_fail_that_job_only(tmp_path):
    good = {"job_id": "L1-2-a", "feature": "L1-2", "state": "done", "created": 100.0, "finished": 110.0,
            "steps": [{"name": "prototype"}], "step_index": 0}
    _job_folder(tmp_path, "L1-2-a", json.dumps(good).encode(), b'{"stage": "done", "done": 2, "total": 2}')
    _job_folder(tmp_path, "L1-2-b", b'{"state": "done", "feature": "L1-2", "created": 5\xff}')
    _job_folder(tmp_path, "L1-2-c", json.dumps({**good, "job_id": "L1-2-c", "created": "yesterday",
                                                "step_index": "first", "steps": "prototype"}).encode(),
                b'{"done": "half", "total": [2], "stage": 7}')
    _job_folder(tmp_path, "L1-2-d", b"[" * 20000)
    _job_folder(tmp_path, "L1-2-e", json.dumps({**good, "job_id": "L1-2-e", "state": "exploded"}).encode())
    by = {j.folder.name: j for j in jobs.list_jobs(tmp_path, "L1-2")}
    assert set(by) == {"L1-2-a", "L1-2-b", "L1-2-c", "L1-2-d", "L1-2-e"}  # none hides the others
    assert by["L1-2-a"].state == "done" and by["L1-2-a"].fraction == 1.0 and by["L1-2-a"].error is None
    b = by["L1-2-b"]
    assert b.state == "failed" and b.error.startswith(f"{tmp_path / 'jobs' / 'L1-2-b' / 'job.json'} is not valid JSON (")
    c = by["L1-2-c"]
    assert c.state == "failed" and c.started is None and c.step_index == 0 and c.done is None and c.stage is None
    assert c.error == ("damaged job record: L1-2-c/job.json: step_index is 'first'; "
                       "L1-2-c/job.json: created is 'yesterday'; L1-2-c/progress.json: stage is 7")
    assert 0.0 <= c.fraction <= 1.0
    assert by["L1-2-d"].state == "failed" and "job.json is not valid JSON (maximum recursion depth" in by["L1-2-d"].error
    assert by["L1-2-e"].state == "failed" and by["L1-2-e"].error == "damaged job record: L1-2-e/job.json: state is 'exploded'"
    jobs.cancel_job(tmp_path / "jobs" / "L1-2-b")  # nothing to cancel, and no exception
    assert jobs.active_job(tmp_path, "L1-2") is None


def test_depth_and_width_from_damaged_files_are_unknown(tmp_path):
    from engine.config import Config

    cfg = Config()
    (tmp_path / "m").mkdir()
    cfg.model.name_or_path = str(tmp_path / "m")
    for content in (b'{"num_hidden_layers": "32"}', b'{"num_hidden_layers": 1e400}', b"[" * 5000, b"\xff"):
        (tmp_path / "m" / "config.json").write_bytes(content)
        assert jobs.model_depth(cfg) is None
    (tmp_path / "m" / "config.json").write_text('{"num_hidden_layers": 6}')
    assert jobs.model_depth(cfg) == 6


def test_cancel_never_signals_a_pid_that_is_not_the_jobs_runner(tmp_path):
    """A damaged or planted job.json naming another process: cancelling marks the job cancelled
    but sends no signal to that process group."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        folder = _job_folder(tmp_path, "L1-2-x", json.dumps({"state": "running", "pid": other.pid,
                                                             "feature": "L1-2"}).encode())
        assert jobs.read_job(folder).state == "running"
        jobs.cancel_job(folder)
        time.sleep(0.3)
        assert other.poll() is None  # still running
        assert jobs.read_job(folder).state == "cancelled"
    finally:
        other.kill()
        other.wait()
