"""Auditing one response log: decode, check every record, re-parse, spool the valid trials.

Runs in a worker process. The fast path decodes a clean file straight into typed records
(msgspec, or orjson when msgspec is missing) and does every check column-wise with
pyarrow/numpy; a file that fails it (damaged JSON, mistyped fields, non-objects) goes
through `reader.load_tolerant` and a per-record Python pass that reports each problem and
converts what can be read (`"trial": "7"` -> 7). Both paths produce the same columns.
The valid records are written to an Arrow IPC spool file; the parent gets back small numpy
arrays (keys and parses) for deduplication and statistics, and the problems.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.audit.problems import problem
from engine.audit.reader import load_tolerant

STUDY_ACTIONS = ("bet", "stop")

try:  # msgspec decodes straight into typed records, skipping unused fields
    import msgspec

    class _Parsed(msgspec.Struct, gc=False):
        action: str | None = None
        bet: int | None = None
        valid: bool | None = None
        reason: str | None = None

    class _Trial(msgspec.Struct, gc=False):
        feature: str
        condition: str
        trial: int
        response: str
        parsed: _Parsed | None = None

    class _TrialRaw(msgspec.Struct, gc=False):  # validation only: the response text is not materialised
        feature: str
        condition: str
        trial: int
        response: msgspec.Raw
        parsed: _Parsed | None = None

    _DECODER = msgspec.json.Decoder(list[_Trial])
    _DECODER_RAW = msgspec.json.Decoder(list[_TrialRaw])
except ImportError:  # pragma: no cover - orjson fallback
    msgspec = None
    _DECODER = _DECODER_RAW = None

_BLANK = " \t\r\n\f\v"


def _raw_is_blank(raw) -> bool:
    """Is this JSON string token (quotes included) blank? Only short tokens that start with
    a space, an escape or the closing quote can be."""
    b = bytes(raw)
    if len(b) > 64 or b[1:2] not in (b" ", b"\\", b'"'):
        return False
    try:
        text = msgspec.json.decode(bytes(raw))
    except msgspec.DecodeError:
        return False
    return isinstance(text, str) and not text.strip(_BLANK)


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


def _fast_columns(raw: bytes, text: bool = True) -> dict | None:
    """Columns of a clean file, or None when the file needs the slow path. Without `text`
    the responses are not decoded; only which ones are blank is returned."""
    if msgspec is not None:
        try:
            recs = (_DECODER if text else _DECODER_RAW).decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        ps = [r.parsed for r in recs]
        blank = None
        if not text:
            lens = np.fromiter(map(len, [r.response for r in recs]), dtype=np.int64, count=len(recs))
            blank = np.zeros(len(recs), dtype=bool)
            for i in np.flatnonzero(lens <= 64):
                blank[i] = _raw_is_blank(recs[i].response)
        return {
            "feature": [r.feature for r in recs],
            "condition": [r.condition for r in recs],
            "trial": [r.trial for r in recs],
            "response": [r.response for r in recs] if text else None,
            "blank": blank,
            "study_action": [p.action if p is not None else None for p in ps],
            "study_bet": [p.bet if p is not None else None for p in ps],
            "study_valid": [p.valid if p is not None else None for p in ps],
            "study_reason": [p.reason if p is not None else None for p in ps],
            "record": None,
        }
    import orjson

    try:
        recs = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(recs, list):
        return None
    return _slow_columns(recs, "", [], strict=True)


def _slow_columns(recs: list, file: str, problems: list, strict: bool = False) -> dict | None:
    """Per-record checks with conversions; `strict` returns None at the first problem."""
    cols: dict[str, list] = {k: [] for k in ("feature", "condition", "trial", "response", "study_action",
                                               "study_bet", "study_valid", "study_reason", "record")}
    for i, r in enumerate(recs):
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
            if isinstance(t, str) and t.strip().isdigit():
                conv = int(t.strip())
            elif isinstance(t, float) and math.isfinite(t) and t.is_integer():
                conv = int(t)
            if conv is None:
                bad = True
                problems.append(problem("invalid_field", file, i, "trial", "trial must be an integer", value=t))
            else:
                problems.append(problem("mistyped_field", file, i, "trial", f"trial {t!r} read as {conv}", value=t))
                t = conv
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
            if isinstance(bet, float) and math.isfinite(bet) and bet.is_integer():
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
        cols["study_action"].append(action if isinstance(action, str) else None)
        cols["study_bet"].append(bet)
        cols["study_valid"].append(valid)
        cols["study_reason"].append(reason if isinstance(reason, str) else None)
        cols["record"].append(i)
    return cols


def _arr(values: list, typ):
    """pa.array of a Python list; the untyped conversion is much faster for msgspec's
    (shared) short strings than asking for a type up front."""
    import pyarrow as pa

    a = pa.array(values)
    return a if a.type == typ else a.cast(typ)


def audit_response_file(task: ResponseTask) -> dict:
    """One file, with the cyclic GC paused: decoding creates ~30,000 objects per file, none
    cyclic, and the collector's passes over them cost more than the decode itself."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        return _audit_response_file(task)
    finally:
        if was:
            gc.enable()


def _audit_response_file(task: ResponseTask) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    from engine.audit.parser import ACTIONS, RULES, parse_decisions
    from engine.schema import FEATURE_ID_RE

    t0 = time.perf_counter()
    file = task.name
    problems: list[tuple] = []
    try:
        raw = Path(task.path).read_bytes()
    except OSError as exc:
        return {"name": file, "problems": [problem("unreadable_file", file, message=str(exc))], "n_records": 0}
    cols = _fast_columns(raw, text=task.reparse) if raw[:3] != b"\xef\xbb\xbf" else None
    n_records = None
    utf8_replaced = False
    if cols is None:
        loaded = load_tolerant(raw, file, "responses")
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

    feature = _arr(cols["feature"], pa.string()).dictionary_encode()
    condition = _arr(cols["condition"], pa.string()).dictionary_encode()
    trial = np.asarray(cols["trial"], dtype=np.int64)
    response = _arr(cols["response"], pa.string()) if cols["response"] is not None else None
    study_bet = _arr(cols["study_bet"], pa.int64())
    keep = np.ones(n_ok, dtype=bool)

    # feature names: parsed once per distinct name
    names = feature.dictionary.to_pylist()
    layer_of = np.full(len(names), -1, dtype=np.int64)
    fid_of = np.full(len(names), -1, dtype=np.int64)
    for j, nm in enumerate(names):
        m = FEATURE_ID_RE.match(nm)
        if m and nm == nm.strip():
            layer_of[j], fid_of[j] = int(m.group(1)), int(m.group(2))
    f_idx = feature.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    bad_f = layer_of[f_idx] < 0
    for i in np.flatnonzero(bad_f):
        problems.append(problem("malformed_feature", file, int(record[i]), "feature", value=names[f_idx[i]]))
    keep &= ~bad_f

    cnames = condition.dictionary.to_pylist()
    c_known = np.array([c in task.conditions for c in cnames], dtype=bool)
    c_global = np.array([task.conditions.index(c) if c in task.conditions else -1 for c in cnames], dtype=np.int64)
    c_idx = condition.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    bad_c = ~c_known[c_idx] if len(cnames) else np.zeros(n_ok, bool)
    for i in np.flatnonzero(bad_c & keep):
        problems.append(problem("unknown_condition", file, int(record[i]), "condition", value=cnames[c_idx[i]]))
    keep &= ~bad_c

    bad_t = trial < 0
    for i in np.flatnonzero(bad_t & keep):
        problems.append(problem("invalid_field", file, int(record[i]), "trial", "trial must be >= 0", value=int(trial[i])))
    keep &= ~bad_t

    if cols.get("blank") is not None:
        blank = cols["blank"]
    else:
        blank = pc.fill_null(pc.match_substring_regex(response, r"^[ \t\r\n\f\v]*$"), True).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(blank & keep):
        problems.append(problem("empty_response", file, int(record[i]), "response",
                                value=cols["response"][i] if cols["response"] is not None else None))

    sb = study_bet.to_numpy(zero_copy_only=False)
    sb_valid = ~np.isnan(sb.astype(np.float64)) if sb.dtype.kind == "f" else np.ones(n_ok, bool)
    sbv = np.where(sb_valid, sb, 0).astype(np.int64)
    absurd = sb_valid & (sbv != 0) & ((sbv < task.min_bet) | (sbv > task.max_bet))
    for i in np.flatnonzero(absurd & keep):
        problems.append(problem("absurd_bet", file, int(record[i]), "parsed.bet", value=int(sbv[i])))

    if utf8_replaced:
        bad_u = pc.fill_null(pc.match_substring(response, "\ufffd"), False).to_numpy(zero_copy_only=False)
        hits = np.flatnonzero(bad_u)
        for j, pr in enumerate(problems):
            if pr[0] == "invalid_utf8" and len(hits):
                problems[j] = pr[:3] + (int(record[hits[0]]), "response") + pr[5:]

    # our re-parse
    prompt_safe = np.array([c.startswith("safe") for c in task.conditions], dtype=bool)
    safe = prompt_safe[np.maximum(c_global[c_idx], 0)] if len(cnames) else np.zeros(n_ok, bool)
    if task.reparse:
        action, bet, valid, rule = parse_decisions(response, safe, task.min_bet, task.max_bet)
    else:
        action = np.full(n_ok, 2, np.int8)
        bet = np.full(n_ok, -1, np.int32)
        valid = np.zeros(n_ok, bool)
        rule = np.zeros(n_ok, np.int8)
    sa = _arr(cols["study_action"], pa.string())
    s_stop = np.where(pc.fill_null(pc.equal(sa, "stop"), False).to_numpy(zero_copy_only=False), 1,
                      np.where(pc.fill_null(pc.equal(sa, "bet"), False).to_numpy(zero_copy_only=False), 0, -1))
    s_valid = _arr(cols["study_valid"], pa.bool_())
    s_valid_np = pc.fill_null(s_valid, False).to_numpy(zero_copy_only=False)

    kidx = np.flatnonzero(keep)
    spool_path = None
    if task.spool is not None and len(kidx):
        take = pa.array(kidx)
        lay = layer_of[f_idx[kidx]]
        cond_names = [task.conditions[i] for i in range(len(task.conditions))]
        prompts = np.array([c.split("_", 1)[0] for c in cond_names], dtype=object)
        patches = np.array([c.split("_with_", 1)[1].replace("_patch", "") if "_with_" in c else "none"
                            for c in cond_names], dtype=object)
        cg = c_global[c_idx[kidx]]
        bet_k = bet[kidx]
        table = pa.table({
            "feature": pc.take(feature, take).cast(pa.string()),
            "layer": pa.array(lay.astype(np.int16)),
            "feature_id": pa.array(fid_of[f_idx[kidx]].astype(np.int32)),
            "condition": pc.take(condition, take).cast(pa.string()),
            "prompt": pa.array(prompts[cg].tolist(), pa.string()),
            "patch": pa.array(patches[cg].tolist(), pa.string()),
            "trial": pa.array(trial[kidx].astype(np.int32)),
            "response": pc.take(response, take),
            "study_action": pc.take(sa, take),
            "study_bet": pc.take(study_bet, take),
            "study_valid": pc.take(s_valid, take),
            "study_reason": pc.take(_arr(cols["study_reason"], pa.string()), take),
            "action": pa.array(np.array(ACTIONS, dtype=object)[action[kidx]].tolist(), pa.string()),
            "bet": pa.array(bet_k, pa.int32(), mask=bet_k < 0),
            "valid": pa.array(valid[kidx]),
            "parse_rule": pa.array(np.array(RULES, dtype=object)[rule[kidx]].tolist(), pa.string()),
            "source_file": pa.array([file] * len(kidx), pa.string()).dictionary_encode().cast(pa.string()),
            "record": pa.array(record[kidx]),
        })
        spool_path = str(Path(task.spool) / f"{task.file_rank:06d}.arrow")
        with pa.OSFile(spool_path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)

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
