"""Auditing one response log: decode, check every record, re-parse, spool the valid trials.

Runs in a worker process. The fast path decodes a clean file straight into typed records
(msgspec, or orjson when msgspec is missing); feature and condition names become integer
codes and every check runs with numpy on them. A file that fails the fast path (damaged
JSON, mistyped fields, non-objects) goes through `reader.load_tolerant` and a per-record
Python pass that reports each problem and converts what can be read (`"trial": "7"` -> 7).
Both paths produce the same columns. A validation stops there (no pyarrow); a full audit
re-parses the replies with pyarrow and writes the valid records to an Arrow IPC spool file.
The parent gets back small numpy arrays (keys and parses) for deduplication and statistics,
and the problems."""

from __future__ import annotations

import math
import operator
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.audit.problems import clean_text, has_surrogate, problem
from engine.audit.reader import LOST, load_tolerant

STUDY_ACTIONS = ("bet", "stop")
BET_LIMIT = 2 ** 62  # a study bet beyond it is absurd and kept out of the int64 column
MAX_TRIAL = 1_000_000  # larger indices are corrupt (and would overflow the dedupe keys)

try:  # msgspec decodes straight into typed records, skipping unused fields
    import msgspec

    # validation only: the study's action and reason are not used (a non-string one is read as
    # None without a problem on the slow path too), so they are skipped without building objects
    class _ParsedChecked(msgspec.Struct, gc=False):
        bet: int | None = None
        valid: bool | None = None

    class _TrialChecked(msgspec.Struct, gc=False):
        feature: str
        condition: str
        trial: int
        response: str
        parsed: _ParsedChecked | None = None

    class _Parsed(_ParsedChecked, gc=False):
        action: str | None = None
        reason: str | None = None

    class _Trial(_TrialChecked, gc=False):
        parsed: _Parsed | None = None

    _DECODER = msgspec.json.Decoder(list[_Trial])
    _DECODER_CHECK = msgspec.json.Decoder(list[_TrialChecked])
except ImportError:  # pragma: no cover - orjson fallback
    msgspec = None
    _DECODER = _DECODER_CHECK = None

@dataclass
class ResponseTask:
    path: str
    name: str
    file_rank: int
    run_id: str
    file_timestamp: str
    conditions: tuple[str, ...]
    min_bet: int
    max_bet: int
    spool: str | None  # folder for the IPC spool; None: do not spool
    reparse: bool


def _fast_columns(raw, text: bool = True) -> dict | None:
    """Columns of a clean file, or None when the file needs the slow path. Without `text`
    (validation only) the study's action/valid/reason are not collected."""
    if msgspec is not None:
        try:
            recs = (_DECODER if text else _DECODER_CHECK).decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
            return None  # invalid UTF-8, nesting thousands deep, ...: the tolerant path says what
        get = operator.attrgetter
        ps = list(map(get("parsed"), recs))
        complete = None not in ps

        def parsed_field(name: str) -> list:
            if complete:
                return list(map(get(name), ps))
            return [getattr(p, name) if p is not None else None for p in ps]

        return {
            "feature": list(map(get("feature"), recs)),
            "condition": list(map(get("condition"), recs)),
            "trial": list(map(get("trial"), recs)),
            "response": list(map(get("response"), recs)),
            "study_action": parsed_field("action") if text else None,
            "study_bet": parsed_field("bet"),
            "study_valid": parsed_field("valid") if text else None,
            "study_reason": parsed_field("reason") if text else None,
            "record": None,
        }
    import orjson

    try:
        recs = orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError, ValueError):
        return None
    if not isinstance(recs, list):
        return None
    return _slow_columns(recs, "", [], strict=True)


def _slow_columns(recs: list, file: str, problems: list, strict: bool = False) -> dict | None:
    """Per-record checks with conversions; `strict` returns None at the first problem."""
    cols: dict[str, list] = {k: [] for k in ("feature", "condition", "trial", "response", "study_action",
                                               "study_bet", "study_valid", "study_reason", "record")}
    for i, r in enumerate(recs):
        if r is LOST:  # a broken record, already reported by the reader
            continue
        if not isinstance(r, dict):
            if strict:
                return None
            problems.append(problem("record_not_object", file, i, None, value=r))
            continue
        bad = False
        vals = {}
        for key in ("feature", "condition", "response"):
            v = r.get(key)
            if key not in r:
                bad = True
                if strict:
                    return None
                problems.append(problem("missing_field", file, i, key))
            elif not isinstance(v, str):
                bad = True
                if strict:
                    return None
                problems.append(problem("invalid_field", file, i, key, f"{key} must be a string", value=v))
            elif has_surrogate(v):
                if strict:
                    return None
                problems.append(problem("lone_surrogate", file, i, key, value=v))
                v = clean_text(v)
            vals[key] = v
        t = r.get("trial")
        if "trial" not in r:
            bad = True
            if strict:
                return None
            problems.append(problem("missing_field", file, i, "trial"))
        elif type(t) is not int:
            if strict:
                return None
            conv = None
            if isinstance(t, str) and t.strip().isascii() and t.strip().isdigit() and len(t.strip()) <= 18:
                conv = int(t.strip())
            elif isinstance(t, float) and math.isfinite(t) and t.is_integer():
                conv = int(t)
            if conv is None:
                bad = True
                problems.append(problem("invalid_field", file, i, "trial", "trial must be an integer", value=t))
            else:
                problems.append(problem("mistyped_field", file, i, "trial", f"trial {t!r} read as {conv}", value=t))
                t = conv
        if not bad and not 0 <= t <= MAX_TRIAL:
            if strict:
                return None
            bad = True
            problems.append(problem("invalid_field", file, i, "trial", f"trial must be in 0..{MAX_TRIAL}", value=t))
        if bad:
            continue
        p = r.get("parsed")
        if p is not None and not isinstance(p, dict):
            if strict:
                return None
            problems.append(problem("mistyped_field", file, i, "parsed", "parsed is not an object; ignored", value=p))
            p = None
        p = p or {}
        action, bet, valid, reason = p.get("action"), p.get("bet"), p.get("valid"), p.get("reason")
        if strict and (type(bet) not in (int, type(None)) or type(valid) not in (bool, type(None))
                       or type(action) not in (str, type(None)) or type(reason) not in (str, type(None))):
            return None
        if bet is not None and type(bet) is not int:
            if isinstance(bet, float) and math.isfinite(bet) and bet.is_integer() and abs(bet) <= BET_LIMIT:
                bet = int(bet)
            else:
                # NaN, text, ...: kept as absurd; the study field is left empty
                problems.append(problem("absurd_bet", file, i, "parsed.bet", "the study's bet is not a number", value=bet))
                bet = None
        if valid is not None and not isinstance(valid, bool):
            problems.append(problem("mistyped_field", file, i, "parsed.valid", "parsed.valid is not true/false; ignored",
                                    value=valid))
            valid = None
        cols["feature"].append(vals["feature"])
        cols["condition"].append(vals["condition"])
        cols["trial"].append(t)
        cols["response"].append(vals["response"])
        for fld, v in (("parsed.action", action), ("parsed.reason", reason)):
            if isinstance(v, str) and has_surrogate(v):
                problems.append(problem("lone_surrogate", file, i, fld, value=v))
        action = clean_text(action) if isinstance(action, str) else action
        reason = clean_text(reason) if isinstance(reason, str) else reason
        cols["study_action"].append(action if isinstance(action, str) else None)
        cols["study_bet"].append(bet)
        cols["study_valid"].append(valid)
        cols["study_reason"].append(reason if isinstance(reason, str) else None)
        cols["record"].append(i)
    return cols


def _arr(values: list, typ):
    """pa.array of a Python list, typed up front: inferring the type first costs ~25x more
    for 9,000 replies (8 ms against 0.3 ms)."""
    import pyarrow as pa

    return pa.array(values, typ)


def _codes(values: list) -> tuple[np.ndarray, list]:
    """Integer codes (in order of first appearance) and the distinct values: one dict lookup
    per value, several times faster here than pyarrow's dictionary_encode of a Python list."""
    names = list(dict.fromkeys(values))
    index = {n: i for i, n in enumerate(names)}
    return np.fromiter(map(index.__getitem__, values), dtype=np.int32, count=len(values)), names


def _run_codes(values: list) -> tuple[np.ndarray, list]:
    """As `_codes` for values that come in runs (a log holds a feature's trials together):
    the values are hashed once per run, not once per record."""
    n = len(values)
    if n == 0:
        return np.zeros(0, np.int32), []
    a = np.array(values, dtype=object)
    head = np.empty(n, dtype=bool)
    head[0] = True
    np.not_equal(a[1:], a[:-1], out=head[1:])
    starts = np.flatnonzero(head)
    codes, names = _codes(a[starts].tolist())
    return np.repeat(codes, np.diff(np.append(starts, n))), names


def _dict_encode(values: list, coded: tuple | None = None):
    """Dictionary-encode a list of strings (None allowed) into an Arrow DictionaryArray
    (`coded`: its `_codes` when already computed)."""
    import pyarrow as pa

    codes, names = coded if coded is not None else _codes(values)
    if None in names:  # keep nulls as nulls
        mask = codes == names.index(None)
        names = [n if n is not None else "" for n in names]
        return pa.DictionaryArray.from_arrays(pa.array(codes, mask=mask), pa.array(names, pa.string()))
    return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(names, pa.string()))


def _decode(codes, names):
    """Strings from integer codes into `names`, in C++ (a string column without Python strings)."""
    import pyarrow as pa

    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(codes, dtype=np.int32)),
                                          pa.array(list(names), pa.string())).cast(pa.string())


def _study_bets(values: list) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(bets as int64 with 0 where missing, present mask, rows whose bet is beyond +-BET_LIMIT
    (absurd; left out of the column)): the study's parsed.bet."""
    if None not in values:
        try:
            arr = np.array(values, dtype=np.int64)
        except OverflowError:  # beyond int64: the careful path below
            pass
        else:
            if not len(arr) or int(np.abs(arr).max()) <= BET_LIMIT:
                return arr, np.ones(len(values), bool), []
    huge = [i for i, v in enumerate(values) if v is not None and not -BET_LIMIT <= v <= BET_LIMIT]
    if huge:
        values = list(values)
        for i in huge:
            values[i] = None
    if None in values:
        arr = np.array(values, dtype=np.float64)  # None -> NaN; the rest within +-2^62
        present = ~np.isnan(arr)
        return np.where(present, arr, 0).astype(np.int64), present, huge
    return np.array(values, dtype=np.int64), np.ones(len(values), bool), huge


def _trials(values: list) -> np.ndarray:
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:  # beyond int64: reported as out of range below
        return np.array([min(max(v, -1), MAX_TRIAL + 1) for v in values], dtype=np.int64)


WS_CHARS = " \t\r\n\f\v"
_BUF = bytearray(0)


def _read(path: str) -> memoryview:
    """The file's bytes in a buffer reused from file to file (decoding copies what it keeps):
    a fresh 4 MB bytes object per log costs more in page faults than the read itself.
    Opened without blocking and refused unless a regular file (a FIFO put in its place after
    the listing would block the read forever)."""
    import stat

    global _BUF
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb", buffering=0) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"not a regular file: {path}")
        size = st.st_size
        if len(_BUF) <= size:
            _BUF = bytearray(size + (size >> 4) + 4096)
        view = memoryview(_BUF)
        n = 0
        while True:
            k = fh.readinto(view[n:])
            if not k:
                break
            n += k
            if n == len(_BUF):  # the file grew while being read
                fh.seek(0)
                return memoryview(fh.read())
        return view[:n]


def audit_response_file(task: ResponseTask) -> dict:
    """One file, with the cyclic GC paused: decoding creates ~30,000 objects per file, none
    cyclic, and the collector's passes over them cost more than the decode itself.

    Isolated: an unexpected exception on the fast path retries the file on the tolerant path
    (each record checked on its own), and one there too becomes a `read_failed` problem row
    for this file, never the run's failure."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        try:
            return _audit_response_file(task)
        except Exception as first:  # noqa: BLE001 - anything the data can cause is this file's problem
            try:
                res = _audit_response_file(task, tolerant=True)
            except Exception as exc:  # noqa: BLE001
                return _failed(task, [problem("read_failed", task.name, message=f"{type(exc).__name__}: {exc}"[:300])])
            res["problems"].append(problem("read_failed", task.name, message=f"the fast reader failed "
                                           f"({type(first).__name__}: {first}); read record by record instead"[:300]))
            return res
    finally:
        if was:
            gc.enable()


def _failed(task: ResponseTask, problems: list) -> dict:
    """The result of a file with no usable record."""
    return {"name": task.name, "file_rank": task.file_rank, "n_records": 0, "n_valid": 0, "problems": problems,
            "spool": None, "seconds": 0.0}


def _audit_response_file(task: ResponseTask, tolerant: bool = False) -> dict:
    """Checks with numpy on codes of the decoded values; pyarrow only for the re-parse and the
    spooled table of a full audit (a validation never imports it)."""
    from engine.schema import FEATURE_ID_RE

    t0 = time.perf_counter()
    file = task.name
    problems: list[tuple] = []
    try:
        raw = _read(task.path)
    except OSError as exc:
        return _failed(task, [problem("unreadable_file", file, message=str(exc))])
    cols = None
    if not tolerant and bytes(raw[:3]) != b"\xef\xbb\xbf":
        cols = _fast_columns(raw, text=task.reparse)  # msgspec refuses lone surrogates: tolerant path
    n_records = None
    utf8_replaced = False
    if cols is None:
        loaded = load_tolerant(bytes(raw), file, "responses")
        problems.extend(loaded.problems)
        utf8_replaced = loaded.utf8_replaced
        recs = loaded.records or []
        n_records = len(recs)
        cols = _slow_columns(recs, file, problems)
    del raw
    n_ok = len(cols["feature"])
    if n_records is None:
        n_records = n_ok
    record = np.arange(n_ok, dtype=np.int32) if cols["record"] is None else np.asarray(cols["record"], dtype=np.int32)
    responses = cols["response"]

    f_idx, names = _run_codes(cols["feature"])
    c_idx, cnames = _run_codes(cols["condition"])
    trial = _trials(cols["trial"])
    keep = np.ones(n_ok, dtype=bool)

    # feature names: parsed once per distinct name
    layer_of = np.full(len(names), -1, dtype=np.int64)
    fid_of = np.full(len(names), -1, dtype=np.int64)
    for j, nm in enumerate(names):
        m = FEATURE_ID_RE.match(nm)
        if m and nm == nm.strip():
            layer_of[j], fid_of[j] = int(m.group(1)), int(m.group(2))
    bad_f = layer_of[f_idx] < 0
    for i in np.flatnonzero(bad_f):
        problems.append(problem("malformed_feature", file, int(record[i]), "feature", value=names[f_idx[i]]))
    keep &= ~bad_f

    c_global = np.array([task.conditions.index(c) if c in task.conditions else -1 for c in cnames], dtype=np.int64)
    bad_c = c_global[c_idx] < 0 if len(cnames) else np.zeros(n_ok, bool)
    for i in np.flatnonzero(bad_c & keep):
        problems.append(problem("unknown_condition", file, int(record[i]), "condition", value=cnames[c_idx[i]]))
    keep &= ~bad_c

    bad_t = (trial < 0) | (trial > MAX_TRIAL)
    for i in np.flatnonzero(bad_t & keep):
        problems.append(problem("invalid_field", file, int(record[i]), "trial", f"trial must be in 0..{MAX_TRIAL}",
                                value=cols["trial"][i]))
    keep &= ~bad_t

    ws = WS_CHARS
    for i in [i for i, r in enumerate(responses) if not r.lstrip(ws)]:  # blank replies are rare
        if keep[i]:
            problems.append(problem("empty_response", file, int(record[i]), "response", value=responses[i]))

    sbv, sb_valid, huge = _study_bets(cols["study_bet"])
    absurd = sb_valid & (sbv != 0) & ((sbv < task.min_bet) | (sbv > task.max_bet))
    for i in np.flatnonzero(absurd & keep):
        problems.append(problem("absurd_bet", file, int(record[i]), "parsed.bet", value=int(sbv[i])))
    for i in huge:
        if keep[i]:
            problems.append(problem("absurd_bet", file, int(record[i]), "parsed.bet",
                                    "the study's bet is too large to store; left empty", value=cols["study_bet"][i]))

    if utf8_replaced:
        hit = next((i for i, r in enumerate(responses) if "\ufffd" in r), None)
        for j, pr in enumerate(problems):
            if pr[0] == "invalid_utf8" and hit is not None:
                problems[j] = pr[:3] + (int(record[hit]), "response") + pr[5:]

    kidx = np.flatnonzero(keep)
    spool_path = None
    if task.reparse:
        prompt_safe = np.array([c.startswith("safe") for c in task.conditions], dtype=bool)
        safe = prompt_safe[np.maximum(c_global[c_idx], 0)] if len(cnames) else np.zeros(n_ok, bool)
        action, bet, valid, s_stop, s_valid_np, spool_path = _reparse_and_spool(
            task, cols, responses, safe, f_idx, names, layer_of, fid_of, c_idx, c_global, trial, record, kidx,
            sbv, sb_valid)
    else:  # the study's parse is compared with ours only in a full audit
        action = np.full(n_ok, 2, np.int8)
        bet = np.full(n_ok, -1, np.int32)
        s_stop = np.full(n_ok, -1, np.int8)
        s_valid_np = np.zeros(n_ok, bool)

    # compact arrays for the parent: keys, parses, and the study's parses
    used = np.unique(f_idx[kidx]) if len(kidx) else np.zeros(0, np.int64)
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return {
        "name": file,
        "file_rank": task.file_rank,
        "n_records": int(n_records),
        "n_valid": int(len(kidx)),
        "problems": problems,
        "features": [names[j] for j in used],
        "layers": layer_of[used].tolist(),
        "feature_ids": fid_of[used].tolist(),
        "f": remap[f_idx[kidx]].astype(np.int32),
        "c": c_global[c_idx[kidx]].astype(np.int8),
        "t": trial[kidx].astype(np.int32),
        "rec": record[kidx],
        "action": action[kidx].astype(np.int8),
        "bet": bet[kidx].astype(np.int16),
        "s_stop": s_stop[kidx].astype(np.int8),
        "s_valid": s_valid_np[kidx].astype(bool),
        "s_bet": np.where(sb_valid[kidx], sbv[kidx], -1).astype(np.int32),
        "spool": spool_path,
        "seconds": time.perf_counter() - t0,
    }


def _reparse_and_spool(task: ResponseTask, cols: dict, responses: list, safe, f_idx, names, layer_of, fid_of, c_idx,
                       c_global, trial, record, kidx, sbv, sb_valid):
    """Our re-parse of every reply, the study's parse as arrays, and the valid records
    spooled to an Arrow IPC file for the parent to write into trials.parquet."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from engine.audit.parser import ACTIONS, RULES, parse_decisions

    response = _arr(responses, pa.string())
    action, bet, valid, rule = parse_decisions(response, safe, task.min_bet, task.max_bet)
    sa_codes, sa_names = _codes(cols["study_action"])
    s_stop = np.array([1 if n == "stop" else 0 if n == "bet" else -1 for n in sa_names], dtype=np.int8)[sa_codes] \
        if len(sa_names) else np.zeros(0, np.int8)
    s_valid = pa.array(cols["study_valid"], pa.bool_())
    s_valid_np = pc.fill_null(s_valid, False).to_numpy(zero_copy_only=False)

    spool_path = None
    if task.spool is not None and len(kidx):
        every = len(kidx) == len(responses)  # the usual: no invalid record to leave out

        def rows(a):
            return a if every else pc.take(a, pa.array(kidx))

        cond_names = list(task.conditions)
        prompts = [c.split("_", 1)[0] for c in cond_names]
        patches = [c.split("_with_", 1)[1].replace("_patch", "") if "_with_" in c else "none" for c in cond_names]
        fk = f_idx[kidx]
        cg = c_global[c_idx[kidx]]
        bet_k = bet[kidx]
        table = pa.table({
            "feature": _decode(fk, names),
            "layer": pa.array(layer_of[fk].astype(np.int16)),
            "feature_id": pa.array(fid_of[fk].astype(np.int32)),
            "condition": _decode(cg, cond_names),
            "prompt": _decode(cg, prompts),
            "patch": _decode(cg, patches),
            "trial": pa.array(trial[kidx].astype(np.int32)),
            "response": rows(response),
            "study_action": rows(_dict_encode(cols["study_action"], (sa_codes, sa_names))).cast(pa.string()),
            "study_bet": rows(pa.array(sbv, pa.int64(), mask=~sb_valid)),
            "study_valid": rows(s_valid),
            "study_reason": rows(_dict_encode(cols["study_reason"], _run_codes(cols["study_reason"]))).cast(pa.string()),
            "action": _decode(action[kidx], ACTIONS),
            "bet": pa.array(bet_k, pa.int32(), mask=bet_k < 0),
            "valid": pa.array(valid[kidx]),
            "parse_rule": _decode(rule[kidx], RULES),
            "source_file": _decode(np.zeros(len(kidx), np.int32), [task.name]),
            "record": pa.array(record[kidx]),
            "run_id": _decode(np.zeros(len(kidx), np.int32), [task.run_id]),
            "file_timestamp": _decode(np.zeros(len(kidx), np.int32), [task.file_timestamp]),
        })
        spool_path = str(Path(task.spool) / f"{task.file_rank:06d}.arrow")
        with pa.OSFile(spool_path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    return action, bet, valid, s_stop, s_valid_np, spool_path


def empty_trials_schema():
    """The trials table's schema (for a table with no rows)."""
    import pyarrow as pa

    return pa.schema([
        ("feature", pa.string()), ("layer", pa.int16()), ("feature_id", pa.int32()), ("condition", pa.string()),
        ("prompt", pa.string()), ("patch", pa.string()), ("trial", pa.int32()), ("response", pa.string()),
        ("study_action", pa.string()), ("study_bet", pa.int64()), ("study_valid", pa.bool_()),
        ("study_reason", pa.string()), ("action", pa.string()), ("bet", pa.int32()), ("valid", pa.bool_()),
        ("parse_rule", pa.string()), ("source_file", pa.string()), ("record", pa.int32()),
        ("run_id", pa.string()), ("file_timestamp", pa.string()),
    ])
