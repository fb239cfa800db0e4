"""Step 0 orchestration: files -> workers -> dedupe -> checks -> statistics -> tables.

Worker processes read the files: one task folds every checkpoint file (oldest first) into
the newest copy of each record (per (layer, feature_id), by file time; checkpoints are
cumulative, so they are never summed); each response log is decoded, checked and re-parsed,
its valid records spooled to Arrow IPC, and small numpy arrays (keys and parses) returned.
Logs are handed out newest first and their results taken in that order, so the parent
knows at once which trials a newer copy supersedes (per (feature, condition, trial): later
file, then later record, wins) and streams the winning spooled rows into trials.parquet in
row groups while the workers read on. It then runs the feature-level checks and the
statistics on the arrays. Memory stays flat in the number of files: one file's records per
worker plus ~25 bytes per trial of keys and parses."""

from __future__ import annotations

import collections
import datetime as dt
import os
import shutil
import time
from pathlib import Path

import numpy as np

from engine.audit import files as F
from engine.audit import outputs as O
from engine.audit.checkpoints import CHECKPOINT_COLUMNS, audit_checkpoint_files
from engine.audit.problems import COLUMNS, KINDS, problem
from engine.audit.responses import MAX_TRIAL, ResponseTask, audit_response_file
from engine.config import Config
from engine.errors import UserError
from engine.schema import (AUDIT_CHECKPOINT_RECORDS, AUDIT_FEATURE_CONDITIONS, AUDIT_FEATURE_EFFECTS,
                           AUDIT_PROBLEMS, AUDIT_TRIALS, AUDIT_VALIDATION, CONDITION_SETS,
                           atomic_write_json, atomic_write_parquet, with_schema)

ROW_GROUP_ROWS = 256 * 1024


def resolve_conditions(cfg: Config) -> tuple[str, ...]:
    if cfg.data.condition_set == "custom":
        if not cfg.data.conditions:
            raise UserError("config data.conditions is empty but data.condition_set is custom")
        return tuple(cfg.data.conditions)
    return tuple(CONDITION_SETS[cfg.data.condition_set])


def _work(item):
    import gc

    gc.disable()  # see audit_response_file; workers only hold acyclic data
    kind, payload = item
    if kind == "checkpoint":
        return kind, audit_checkpoint_files(payload)
    return kind, audit_response_file(payload)


def _iter_results(items: list, workers: int, full: bool):
    # imported before forking, so the workers share them instead of importing each
    import msgspec  # noqa: F401

    if full:  # a validation does not need pyarrow at all
        import pandas  # noqa: F401  (pyarrow imports it at its first array, in every worker otherwise)
        import pyarrow.compute  # noqa: F401

        from engine.audit import parser  # noqa: F401

    if workers <= 1 or len(items) < 4:
        for it in items:
            yield _work(it)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # not multiprocessing.Pool: its worker-handler thread polls the result pipe too and spins
    # while a result waits to be read, taking the GIL from the parent's own work
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    ex = ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        results = ex.map(_work, items)  # in order: logs newest first; the workers are forked now
        if full:
            _warm_imports()
        yield from results
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _warm_imports() -> None:
    """Import what the tables and statistics need (pyarrow.parquet, scipy.special) in a thread
    while the workers read, instead of after them. Started only once the workers are forked
    (a fork during an import could leave a child holding a module lock)."""
    import threading

    def run() -> None:
        import pyarrow.parquet  # noqa: F401
        import scipy.special  # noqa: F401

    threading.Thread(target=run, name="audit-imports", daemon=True).start()


def run_audit(cfg: Config, *, checkpoints_dir: str | None, responses_dir: str | None, run: str | None = None,
              since: str | None = None, until: str | None = None, full: bool = True,
              show_progress: bool = True) -> dict:
    """Audit the folders; write the tables (unless `full` is False: validation and counts only)."""
    from engine.progress import Progress

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    conditions = resolve_conditions(cfg)
    acfg = cfg.audit
    if not responses_dir and checkpoints_dir and (Path(checkpoints_dir) / "response_logs").is_dir():
        responses_dir = str(Path(checkpoints_dir) / "response_logs")  # the study's layout
    if not checkpoints_dir and not responses_dir:
        raise UserError("no data folders: set data.checkpoints_dir / data.responses_dir or pass --checkpoints/--responses")
    not_files: list[tuple] = []
    ck = F.discover(checkpoints_dir, cfg.data.checkpoint_patterns, "checkpoint", problems=not_files)
    rs = F.discover(responses_dir, cfg.data.response_patterns, "responses", exclude_patterns=cfg.data.checkpoint_patterns,
                    problems=not_files)
    runs = F.detect_runs(ck + rs, acfg.run_gap_days)
    kept, skipped, chosen = F.select(ck + rs, runs, run, since, until)
    ck = [f for f in kept if f.role == "checkpoint"]
    rs = [f for f in kept if f.role == "responses"]
    problems: list[tuple] = list(not_files)
    for f in kept:
        if f.name != f.path.name:
            problems.append(problem("invalid_utf8", f.name, field="file name",
                                    message="the file name is not UTF-8; shown with U+FFFD"))
        if f.ts_source == "mtime":
            problems.append(problem("no_timestamp", f.name, message=f"ordered by mtime {f.ts_text}"))
    kept_runs = sorted({f.run_id for f in kept})
    if len(kept_runs) > 1:
        problems.append(problem("mixed_runs", None, message=f"files from {len(kept_runs)} runs ({', '.join(kept_runs)}): "
                                "the same feature name can mean different features; pick one with --run",
                                value=", ".join(kept_runs)))
    if checkpoints_dir and not ck:
        problems.append(problem("no_files", str(checkpoints_dir), message="no checkpoint file matched "
                                + ", ".join(cfg.data.checkpoint_patterns)))
    if responses_dir and not rs:
        problems.append(problem("no_files", str(responses_dir), message="no response log matched "
                                + ", ".join(cfg.data.response_patterns)))

    cache = Path(cfg.cache)
    # a full audit writes into a folder of its own, swapped in whole once complete
    work = O.staging_dir(cache) if full else None
    spool = work / ".spool" if full else None
    if spool is not None:
        spool.mkdir()
    order = {f.name + f.role: i for i, f in enumerate(sorted(kept, key=lambda f: (f.timestamp, f.name)))}
    items = []
    if ck:  # one task: cumulative files share most records, checked once per distinct text
        items.append(("checkpoint", [(str(f.path), f.name, order[f.name + f.role], f.ts_text, f.run_id) for f in ck]))
    for f in rs:
        items.append(("responses", ResponseTask(str(f.path), f.name, order[f.name + f.role], f.run_id, f.ts_text,
                                                conditions, acfg.min_bet, acfg.max_bet,
                                                str(spool) if spool else None, full)))
    # checkpoints first; then the logs newest first, so that when a log's results arrive every
    # newer copy of its trials is already known and its winners can be written at once
    items.sort(key=lambda it: (0, 0) if it[0] == "checkpoint" else (1, -it[1].file_rank))

    stream = None
    try:
        t0 = time.perf_counter()
        stream = TrialStream(len(conditions), work / _name(AUDIT_TRIALS) if full else None)
        bar = Progress(len(ck) + len(rs), "audit: reading files", unit="file", disable=None if show_progress else True)
        worker_s = collections.Counter()
        ck_fold = CheckpointFold()
        per_file: list[dict] = []
        for kind, res in _iter_results(items, acfg.workers, full):
            if kind == "checkpoint":
                ck_fold.add(res)  # the newest copy of each record
                per_file.extend(res["per_file"])
            else:
                stream.add(res)
                per_file.append({"file": res["name"], "role": "responses", "records": res["n_records"],
                                 "valid": res.get("n_valid", 0)})
            worker_s[kind] += res.get("seconds", 0.0)
            problems.extend(res["problems"])
            bar.update(res["files"] if kind == "checkpoint" else 1)
        bar.close()
        stream.close()
        timings["read_check"] = time.perf_counter() - t0
        timings.update({f"worker_{k}_s": v for k, v in worker_s.items()})
        t0 = time.perf_counter()
        summary, state = _combine(cfg, conditions, ck_fold, stream, problems, full)
        timings["dedupe_counts"] = time.perf_counter() - t0
        summary["runs_found"] = [r.as_dict() for r in runs]
        summary["run_selected"] = chosen.run_id if chosen else None
        summary["files_skipped"] = [f.name for f in skipped][:50]
        summary["n_files_skipped"] = len(skipped)
        # per file: records read and valid records (before newest-copy selection)
        summary["per_file"] = sorted(per_file, key=lambda d: (d["role"], d["file"]))
        if full:
            t0 = time.perf_counter()
            shutil.rmtree(spool, ignore_errors=True)
            _write_tables(work, state, problems)
            timings["write_tables"] = time.perf_counter() - t0
        out = _final_summary(summary, problems, cfg, conditions, timings, t_start, full, checkpoints_dir,
                             responses_dir, run, since, until)
        if full:
            atomic_write_json(work / _name(AUDIT_VALIDATION), out)
            O.mark_complete(work, out)
            O.swap_in(work, cache)
            work = None
    finally:
        if work is not None and stream is not None and stream.writer is not None:
            try:  # a failed audit: close the half-written trials table before its folder goes
                stream.writer.close()
            except Exception:  # noqa: BLE001 - the folder goes anyway
                pass
        if work is not None:  # failed: the previous audit stays as it was
            shutil.rmtree(work, ignore_errors=True)
    if not full:  # validate-only: the summary alone, beside the tables of the last full audit
        O.recover(cache)
        atomic_write_json(cache / AUDIT_VALIDATION, out)
    return out


def _name(path: str) -> str:
    return path.split("/", 1)[1]  # "audit/x.parquet" -> "x.parquet"


def _final_summary(summary: dict, problems: list, cfg: Config, conditions, timings: dict, t_start: float, full: bool,
                   checkpoints_dir, responses_dir, run, since, until) -> dict:
    acfg = cfg.audit
    _finish_summary(summary, problems, acfg.max_examples_per_kind)
    timings["total"] = time.perf_counter() - t_start
    summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    summary["inputs"] = {"checkpoints_dir": checkpoints_dir, "responses_dir": responses_dir,
                         "checkpoint_patterns": cfg.data.checkpoint_patterns,
                         "response_patterns": cfg.data.response_patterns,
                         "condition_set": cfg.data.condition_set, "conditions": list(conditions),
                         "run": run, "since": since, "until": until}
    summary["mode"] = "full" if full else "validate-only"  # validate-only leaves older tables untouched
    summary["created"] = dt.datetime.now().isoformat(timespec="seconds")
    return with_schema(_ordered(summary))


def _ordered(s: dict) -> dict:
    first = ("causal_by_layer", "total_causal_features", "total_response_features", "joinable_features",
             "join_rate_percent", "total_trials", "audit_results", "validated")
    return {**{k: s[k] for k in first if k in s}, **{k: v for k, v in s.items() if k not in first}}


class TrialStream:
    """Response-log results, arriving newest file first. A trial is kept unless a newer file
    (already seen) or a later record of the same file has the same (feature, condition,
    trial); the kept rows go from the file's spool straight into trials.parquet (row groups)
    while the workers read on. The arrays stay for the statistics."""

    KEY_T = MAX_TRIAL + 1
    BITMAP_MAX = 64 << 20  # bytes; beyond it (huge trial indices) seen keys go to a sorted array

    def __init__(self, n_conditions: int, trials_tmp: Path | None):
        self.C = n_conditions
        self.gcode: dict[str, int] = {}
        self.layer_of: list[int] = []
        self.fid_of: list[int] = []
        # keys (feature, condition, trial) of the files already added: a flag per possible key
        # ((feature * C + condition) * T + trial, T a power of two above the largest trial)
        self.T = 64
        self.seen_map: np.ndarray | None = np.zeros(0, dtype=bool)
        self.seen_sorted = np.zeros(0, dtype=np.int64)  # used instead when the flags grow too big
        self.files: list[dict] = []  # per file with valid trials: arrays + winners
        self.names: dict[int, str] = {}
        self.records_read = 0
        self.n_files = 0
        self.tmp = trials_tmp
        self.writer = None
        self.pending: list = []
        self.pending_rows = 0

    def _seen_before(self, f: np.ndarray, c: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Which rows have a key that an earlier-added (newer) file holds; records the keys."""
        if self.seen_map is not None:
            T = self.T
            while T <= int(t.max()):
                T *= 2
            if len(self.gcode) * self.C * T > self.BITMAP_MAX:  # switch to the sorted array
                self.seen_map = None
                for d in self.files:
                    self._sorted(d["f"], d["c"], d["t"])
            elif T != self.T:  # a larger trial index: the flags again, with the larger T
                self.T, self.seen_map = T, np.zeros(0, dtype=bool)
                for d in self.files:
                    self._flags(d["f"], d["c"], d["t"])
        return self._sorted(f, c, t) if self.seen_map is None else self._flags(f, c, t)

    def _flags(self, f, c, t) -> np.ndarray:
        size = len(self.gcode) * self.C * self.T
        if len(self.seen_map) < size:
            grown = np.zeros(max(size, 2 * len(self.seen_map)), dtype=bool)
            grown[:len(self.seen_map)] = self.seen_map
            self.seen_map = grown
        key = (f * self.C + c.astype(np.int64)) * self.T + t.astype(np.int64)
        before = self.seen_map[key]
        self.seen_map[key] = True
        return before

    def _sorted(self, f, c, t) -> np.ndarray:
        key = (f * self.C + c.astype(np.int64)) * self.KEY_T + t.astype(np.int64)
        before = np.isin(key, self.seen_sorted)
        self.seen_sorted = np.union1d(self.seen_sorted, key)
        return before

    def add(self, res: dict) -> None:
        self.n_files += 1
        self.records_read += res["n_records"]
        self.names[res["file_rank"]] = res["name"]
        if not res.get("n_valid"):
            return
        local = np.empty(len(res["features"]), dtype=np.int64)
        for j, (nm, la, fi) in enumerate(zip(res["features"], res["layers"], res["feature_ids"])):
            c = self.gcode.get(nm)
            if c is None:
                c = self.gcode[nm] = len(self.gcode)
                self.layer_of.append(la)
                self.fid_of.append(fi)
            local[j] = c
        f = local[res["f"]]
        n = len(f)
        # a later record of the same file wins; most files repeat no key, which a count shows
        lkey = (res["f"].astype(np.int64) * self.C + res["c"].astype(np.int64)) * (int(res["t"].max()) + 1) \
            + res["t"].astype(np.int64)
        if int(lkey.max()) < 8 * n + 65536 and np.bincount(lkey).max() <= 1:
            last = np.ones(n, dtype=bool)
        else:
            last = np.zeros(n, dtype=bool)
            last[n - 1 - np.unique(lkey[::-1], return_index=True)[1]] = True
        newer = self._seen_before(f, res["c"], res["t"])  # a newer file has these keys (a restart)
        win = last & ~newer
        arrays = {k: res[k] for k in ("c", "t", "rec", "action", "bet", "s_stop", "s_valid", "s_bet")}
        self.files.append({"rank": res["file_rank"], "f": f, "win": win, **arrays})
        if res.get("spool"):
            self._write(res, win)

    def _write(self, res: dict, win: np.ndarray) -> None:
        import pyarrow as pa

        with pa.memory_map(res["spool"]) as src:
            t = pa.ipc.open_file(src).read_all()  # zero-copy: the mapping outlives the unlink below
        if not win.all():
            t = t.filter(pa.array(win))
        self.pending.append(t)
        self.pending_rows += t.num_rows
        os.unlink(res["spool"])
        if self.pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        t = pa.concat_tables(self.pending)
        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.tmp), t.schema, compression="zstd")
        self.writer.write_table(t, row_group_size=ROW_GROUP_ROWS)
        self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        if self.tmp is None:
            return
        self._flush()
        if self.writer is None:
            import pyarrow.parquet as pq

            from engine.audit.responses import empty_trials_schema

            self.writer = pq.ParquetWriter(str(self.tmp), empty_trials_schema(), compression="zstd")
        self.writer.close()


class CheckpointFold:
    """Newest valid copy of each checkpoint record (folded by `audit_checkpoint_files`: per
    (layer, feature_id) the copy with the largest (file rank, record index) wins) and the counts."""

    def __init__(self) -> None:
        self.newest: dict[tuple[int, int], dict] = {}
        self.schema_counts: collections.Counter = collections.Counter()
        self.headers_n: collections.Counter = collections.Counter()
        self.records_read = 0
        self.valid = 0
        self.files = 0

    def add(self, res: dict) -> None:
        self.newest = res["newest"]
        self.schema_counts, self.headers_n = res["schema_counts"], res["headers_n"]
        self.records_read, self.valid, self.files = res["records_read"], res["valid"], res["files"]


def _combine(cfg: Config, conditions, ck: CheckpointFold, stream: TrialStream, problems, full: bool):
    # ---- checkpoints: newest record per (layer, feature_id) -------------------------
    newest = ck.newest
    schema_counts, headers_n, ck_records_read = ck.schema_counts, ck.headers_n, ck.records_read
    ck_table = None
    if full:
        import pandas as pd

        ck_table = pd.DataFrame([newest[k] for k in sorted(newest)],
                                columns=list(CHECKPOINT_COLUMNS) + ["file_timestamp", "run_id"])
    n_default = cfg.data.n_trials_per_condition or (headers_n.most_common(1)[0][0] if headers_n else None)

    # ---- responses: the stream chose the newest copy of each trial ----------------------
    gcode = stream.gcode
    layer_of, fid_of = stream.layer_of, stream.fid_of
    records_read = stream.records_read
    files = sorted(stream.files, key=lambda d: d["rank"])
    stream.files = []
    frank = np.repeat(np.array([d["rank"] for d in files], np.int64), [len(d["f"]) for d in files]) \
        if files else np.zeros(0, np.int64)
    cat = {}
    for k in ("f", "c", "t", "rec", "action", "bet", "s_stop", "s_valid", "s_bet", "win"):
        # each file's copy is dropped once concatenated, so the two never coexist in full
        cat[k] = np.concatenate([d.pop(k) for d in files]) if files else np.zeros(0, np.int64)
    del files
    n_valid_records = len(cat["f"])
    winners = cat["win"].astype(bool)
    duplicates = int(n_valid_records - winners.sum())
    rank_names = stream.names
    C = len(conditions)
    if duplicates:
        # name the newer file that superseded each copy: the winner of its key
        key = _dense_keys(cat["f"], cat["c"], cat["t"], C)
        lose = ~winners
        win_rank = _lookup(key[winners], frank[winners], key[lose])
        lose_rank = frank[lose]
        R = int(max(lose_rank.max(), win_rank.max())) + 1
        pair, n_pair = np.unique(lose_rank * R + win_rank, return_counts=True)
        per_loser = collections.defaultdict(list)
        for code, n in zip(pair.tolist(), n_pair.tolist()):
            per_loser[code // R].append((code % R, n))
        for lr, lst in per_loser.items():
            total = sum(n for _, n in lst)
            newer = ", ".join(f"{rank_names[wr]} ({n})" if wr != lr else f"later records of the same file ({n})"
                              for wr, n in lst)
            problems.append(problem("duplicate_trials", rank_names[lr], message=f"{total} trials superseded by {newer}",
                                    value=total))
    w = winners
    F_ = len(gcode)
    names = np.array(sorted(gcode, key=gcode.get), dtype=object)
    from engine.audit import stats as S

    counts = S.feature_conditions(cat["f"][w], cat["c"][w], cat["action"][w], cat["bet"][w], cat["s_stop"][w],
                                  cat["s_valid"][w], F_, conditions)
    n_trials = counts["n_trials"].reshape(F_, C) if F_ else np.zeros((0, C), np.int64)

    # ---- feature-level checks ---------------------------------------------------------
    ck_n = {r["feature"]: r["n_trials_per_condition"] for r in newest.values()}
    log_features = set(gcode)
    ck_features = {r["feature"] for r in newest.values()}
    expected_n = np.array([ck_n.get(nm) or n_default or 0 for nm in names], dtype=np.int64) if F_ else np.zeros(0, np.int64)
    for i in np.flatnonzero((n_trials == 0).any(axis=1)) if C else []:
        miss = [conditions[j] for j in np.flatnonzero(n_trials[i] == 0)]
        problems.append(problem("missing_conditions", None, None, "condition", f"{names[i]} has no trials in {', '.join(miss)}",
                                value=names[i]))
    few = (n_trials > 0) & (n_trials < expected_n[:, None]) if F_ else np.zeros((0, C), bool)
    for i, j in zip(*np.nonzero(few)):
        problems.append(problem("too_few_trials", None, None, "trial",
                                f"{names[i]} {conditions[j]}: {n_trials[i, j]} of {expected_n[i]} trials", value=names[i]))
    if F_ and n_valid_records:
        tw = cat["t"][w]
        fw = cat["f"][w]
        over = (expected_n[fw] > 0) & (tw >= expected_n[fw])
        if over.any():
            for fi, n in zip(*np.unique(fw[over], return_counts=True)):
                problems.append(problem("trial_out_of_range", None, None, "trial",
                                        f"{names[fi]}: {n} trials with index >= {expected_n[fi]}", value=names[fi]))
    for nm in sorted(log_features - ck_features):
        problems.append(problem("feature_without_checkpoint", None, None, "feature", f"{nm} is in the logs only", value=nm))
    for nm in sorted(ck_features - log_features):
        problems.append(problem("checkpoint_without_trials", newest[_fkey(nm)]["source_file"], newest[_fkey(nm)]["record"],
                                "feature", f"{nm} has no trials in the logs", value=nm))

    # ---- plan keys ----------------------------------------------------------------------
    causal = sorted((r for r in newest.values() if r["checkpoint_verdict"]), key=lambda r: (r["layer"], r["feature_id"]))
    by_layer = collections.Counter(r["layer"] for r in causal)
    causal_names = {r["feature"] for r in causal}
    joinable = len(causal_names & log_features)
    n_unique = int(w.sum())
    conditions_found = _conditions_found(problems, cat["c"], conditions)
    summary = {
        "causal_by_layer": {str(k): v for k, v in sorted(by_layer.items())},
        "total_causal_features": len(causal),
        "total_response_features": len(log_features),
        "joinable_features": joinable,
        "join_rate_percent": round(100.0 * joinable / len(causal), 3) if causal else 0.0,
        "total_trials": n_unique,
        "files_read": {"checkpoints": ck.files, "responses": stream.n_files},
        "records_read": {"checkpoint": ck_records_read, "responses": records_read},
        "valid_unique_trials": n_unique,
        "duplicates": duplicates,
        "invalid_records": records_read - n_valid_records,
        "checkpoint_records": {"read": ck_records_read, "valid": ck.valid, "unique": len(newest),
                               "superseded": ck.valid - len(newest), "schemas": dict(schema_counts)},
        "features": {"in_checkpoints": len(ck_features), "in_logs": len(log_features),
                     "in_both": len(ck_features & log_features), "logs_only": len(log_features - ck_features),
                     "checkpoints_only": len(ck_features - log_features)},
        "n_trials_per_condition": n_default,
        "conditions_expected": list(conditions),
        "conditions_found": conditions_found,
    }
    if n_unique:
        sa, sv, ac = cat["s_stop"][w], cat["s_valid"][w], cat["action"][w]
        ours_valid = ac != 2
        both = ours_valid & sv & (sa >= 0)
        study_stop = sa == 1
        ours_stop = ac == 1
        sb, ob = cat["s_bet"][w], cat["bet"][w]
        bet_both = both & ~study_stop & ~ours_stop & (ob >= 0)
        summary["parser_comparison"] = {
            "trials": n_unique,
            "study_valid": int(sv.sum()), "ours_valid": int(ours_valid.sum()),
            "both_valid": int(both.sum()),
            "action_disagree": int((both & (study_stop != ours_stop)).sum()),
            "study_stop_ours_bet": int((both & study_stop & ~ours_stop).sum()),
            "study_bet_ours_stop": int((both & ~study_stop & ours_stop).sum()),
            "bet_amount_disagree": int((bet_both & (sb != ob)).sum()),
            "study_valid_ours_invalid": int((sv & ~ours_valid).sum()),
            "study_invalid_ours_valid": int((~sv & ours_valid).sum()),
        } if full else None
    state = {"conditions": conditions, "names": names, "layer_of": np.array(layer_of, np.int64),
             "fid_of": np.array(fid_of, np.int64), "counts": counts, "newest": newest, "ck_table": ck_table,
             "winners": winners, "frank": frank, "rec": cat["rec"], "expected_n": expected_n}
    if full:
        _effects(cfg, state, summary)
    return summary, state


def _dense_keys(f, c, t, C: int) -> np.ndarray:
    """(feature, condition, trial) as one int64, dense in the trial indices actually used."""
    T = int(t.max()) + 1 if len(t) else 1
    return (f.astype(np.int64) * C + c.astype(np.int64)) * T + t.astype(np.int64)


def _lookup(keys, values, queries) -> np.ndarray:
    """values[keys == q] for each query (keys unique, every query among them): a dense table
    when the keys are compact, else a sorted search."""
    if len(keys) and int(keys.max()) < 8 * len(keys) + 1024:
        table = np.zeros(int(keys.max()) + 1, dtype=np.int64)
        table[keys] = values
        return table[queries]
    order = np.argsort(keys, kind="stable")
    return values[order][np.searchsorted(keys[order], queries)]


def _fkey(name: str) -> tuple[int, int]:
    a, b = name[1:].split("-")
    return int(a), int(b)


def _conditions_found(problems, c, conditions) -> dict:
    found = {conditions[i]: int(n) for i, n in enumerate(np.bincount(c, minlength=len(conditions)).tolist()) if n}
    for p in problems:
        if p[0] == "unknown_condition":
            found[p[6]] = found.get(p[6], 0) + 1
    return dict(sorted(found.items()))


def _effects(cfg: Config, state: dict, summary: dict) -> None:
    import pandas as pd

    from engine.audit import stats as S

    conditions, names, counts = state["conditions"], state["names"], state["counts"]
    F_, C = len(names), len(conditions)
    eff = S.effects(counts, F_, conditions, cfg.audit.alpha, cfg.audit.min_effect)
    # feature x condition table
    fc = pd.DataFrame({
        "feature": np.repeat(names, C).astype(str) if F_ else np.zeros(0, str),
        "layer": np.repeat(state["layer_of"], C),
        "feature_id": np.repeat(state["fid_of"], C),
        "condition": np.tile(np.array(conditions, dtype=object), F_).astype(str) if F_ else np.zeros(0, str),
    })
    prompts = [c.split("_", 1)[0] for c in conditions]
    patches = [c.split("_with_", 1)[1].replace("_patch", "") if "_with_" in c else "none" for c in conditions]
    fc["prompt"] = np.tile(np.array(prompts, dtype=object), F_).astype(str) if F_ else np.zeros(0, str)
    fc["patch"] = np.tile(np.array(patches, dtype=object), F_).astype(str) if F_ else np.zeros(0, str)
    for k in ("n_trials", "n_valid", "n_stop", "n_bet", "study_n_valid", "study_n_stop"):
        fc[k] = counts[k].astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        fc["valid_rate"] = np.where(fc["n_trials"] > 0, fc["n_valid"] / fc["n_trials"], np.nan)
        fc["stop_rate"] = np.where(fc["n_valid"] > 0, fc["n_stop"] / fc["n_valid"], np.nan)
        fc["mean_bet"] = np.where(counts["n_bet_amount"] > 0, counts["bet_sum"] / np.maximum(counts["n_bet_amount"], 1), np.nan)
        fc["study_valid_rate"] = np.where(fc["n_trials"] > 0, fc["study_n_valid"] / fc["n_trials"], np.nan)
        fc["study_stop_rate"] = np.where(fc["study_n_valid"] > 0, fc["study_n_stop"] / fc["study_n_valid"], np.nan)
    state["fc"] = fc.sort_values(["layer", "feature_id"], kind="mergesort").reset_index(drop=True)
    # per-feature effects joined with the checkpoint verdicts (union of both feature sets)
    fe = pd.DataFrame({"feature": names.astype(str) if F_ else np.zeros(0, str),
                       "layer": state["layer_of"], "feature_id": state["fid_of"]})
    fe["n_trials"] = state["counts"]["n_trials"].reshape(F_, C).sum(axis=1) if F_ else np.zeros(0, np.int64)
    for k, v in eff.items():
        fe[k] = v
    ck = state["ck_table"][["feature", "layer", "feature_id", "schema", "cohen_d", "checkpoint_verdict",
                            "checkpoint_direction", "source_file", "run_id"]]
    ck = ck.rename(columns={"source_file": "checkpoint_file", "run_id": "checkpoint_run_id"})
    fe = fe.merge(ck, on=["feature", "layer", "feature_id"], how="outer")
    fe["has_trials"] = fe["n_trials"].fillna(0) > 0
    fe["n_trials"] = fe["n_trials"].fillna(0).astype(np.int64)
    fe["recomputed_verdict"] = fe["recomputed_verdict"].astype("boolean").where(fe["has_trials"], pd.NA)
    fe["has_checkpoint"] = fe["schema"].notna()
    fe["checkpoint_verdict"] = fe["checkpoint_verdict"].astype("boolean")
    fe["verdict_agrees"] = (fe["recomputed_verdict"] == fe["checkpoint_verdict"]).astype("boolean")
    fe = fe.sort_values(["layer", "feature_id"], kind="mergesort").reset_index(drop=True)
    state["fe"] = fe
    both = fe["verdict_agrees"].notna()
    rv = fe["recomputed_verdict"].fillna(False).astype(bool)
    summary["recomputed"] = {
        "alpha": cfg.audit.alpha, "min_effect": cfg.audit.min_effect, "tested_features": int(fe["has_trials"].sum()),
        "causal": int(rv.sum()),
        "by_direction": {d: int(((fe["recomputed_direction"] == d) & rv).sum()) for d in ("safe", "risky", "mixed")},
        "compared_with_checkpoint": int(both.sum()),
        "agree": int(fe["verdict_agrees"].fillna(False).astype(bool).sum()),
        "checkpoint_causal_recomputed_not": int((fe["checkpoint_verdict"].fillna(False).astype(bool) & ~rv & both).sum()),
        "recomputed_causal_checkpoint_not": int((~fe["checkpoint_verdict"].fillna(True).astype(bool) & rv & both).sum()),
    }


def _write_tables(folder: Path, state: dict, problems: list) -> None:
    """The tables, into the audit's temporary folder (the swap makes them visible together)."""
    import pandas as pd

    atomic_write_parquet(folder / _name(AUDIT_FEATURE_CONDITIONS), state["fc"])
    atomic_write_parquet(folder / _name(AUDIT_FEATURE_EFFECTS), state["fe"])
    atomic_write_parquet(folder / _name(AUDIT_CHECKPOINT_RECORDS), state["ck_table"])
    pt = pd.DataFrame(problems, columns=list(COLUMNS))
    pt["record"] = pt["record"].astype("Int64")
    atomic_write_parquet(folder / _name(AUDIT_PROBLEMS), pt)


def _finish_summary(summary: dict, problems: list, cap: int) -> None:
    counts = collections.Counter(p[0] for p in problems)
    sev = collections.Counter(p[1] for p in problems)
    examples: dict[str, list] = {}
    errors, warnings = [], []
    for p in problems:
        ex = examples.setdefault(p[0], [])
        if len(ex) < cap:
            ex.append(dict(zip(COLUMNS, p)))
            where = p[2] or ""
            if p[3] is not None:
                where += f" record {p[3]}"
            if p[4]:
                where += f" field {p[4]}"
            line = f"{p[0]}: {where.strip()}: {p[5]}" + (f" ({p[6]})" if p[6] is not None else "")
            (errors if p[1] == "error" else warnings if p[1] == "warning" else []).append(line)
    validated = sev.get("error", 0) == 0
    summary["audit_results"] = {"errors": errors, "warnings": warnings, "validated": validated,
                                "n_errors": sev.get("error", 0), "n_warnings": sev.get("warning", 0)}
    summary["validated"] = validated
    summary["problem_counts"] = {k: counts[k] for k in sorted(counts)}
    summary["problem_counts_by_severity"] = dict(sorted(sev.items()))
    summary["problem_kinds"] = {k: {"severity": v[0], "meaning": v[1]} for k, v in KINDS.items()}
    summary["examples"] = examples
