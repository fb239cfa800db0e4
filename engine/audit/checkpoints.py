"""Auditing one checkpoint file: three record schemas, detected per record.

* plan (implementation plan V4): feature, layer, feature_id, is_causal, cohen_d;
* Run A (flat): + classified_as, safe/risky_stop_delta, safe/risky_bet_delta, p-values;
* Run B (nested): feature, layer, feature_id, cohen_d, causality{is_causal_safe,
  is_causal_risky, safe/risky_effect_size, safe/risky_p_value, interpretation}.

Each valid record becomes one normalised row (columns `CHECKPOINT_COLUMNS`) with the
record's own verdict and direction:
* verdict: is_causal (plan, Run A) or is_causal_safe or is_causal_risky (Run B);
* direction: Run A's classified_as (safe/risky; neutral -> none); Run B from its effects: a
  causal safe-context test with effect > 0 (the safe patch made the model stop more) votes
  safe, a causal risky-context test with effect > 0 (the risky patch raised the share of big
  bets) votes risky, a causal test with the opposite sign votes mixed; one kind of vote gives
  that direction, anything else mixed. Plan records carry none.
"""

from __future__ import annotations

import math
import time

from engine.audit.problems import clean_text, has_surrogate, problem
from engine.audit.reader import LOST, load_tolerant
from engine.schema import CHECKPOINT_SCHEMA_FLAT, CHECKPOINT_SCHEMA_NESTED, CHECKPOINT_SCHEMA_PLAN, FEATURE_ID_RE

CHECKPOINT_COLUMNS = (
    "feature", "layer", "feature_id", "schema", "cohen_d", "checkpoint_verdict", "checkpoint_direction",
    "classified_as", "interpretation", "safe_effect", "risky_effect", "safe_p_value", "risky_p_value",
    "safe_bet_delta", "risky_bet_delta", "n_trials_per_condition", "source_file", "record",
)
_FLAT_KEYS = ("classified_as", "safe_stop_delta", "risky_stop_delta", "safe_bet_delta", "risky_bet_delta")


def detect_schema(r: dict) -> str | None:
    if isinstance(r.get("causality"), dict):
        return CHECKPOINT_SCHEMA_NESTED
    if any(k in r for k in _FLAT_KEYS):
        return CHECKPOINT_SCHEMA_FLAT
    if "is_causal" in r:
        return CHECKPOINT_SCHEMA_PLAN
    return None


def _int(v, file, i, fld, problems) -> int | None:
    """An int field, converting "12" (reported); None when unreadable (reported)."""
    if type(v) is int:
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isascii() and v.strip().lstrip("-").isdigit() \
            and len(v.strip()) <= 18:
        problems.append(problem("mistyped_field", file, i, fld, f"{fld} {v!r} read as {int(v)}", value=v))
        return int(v)
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) <= 2 ** 62:
        problems.append(problem("mistyped_field", file, i, fld, f"{fld} {v!r} read as {int(v)}", value=v))
        return int(v)
    problems.append(problem("invalid_field", file, i, fld, f"{fld} must be an integer", value=v))
    return None


def _num(v, file, i, fld, problems) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        problems.append(problem("invalid_field", file, i, fld, f"{fld} must be a number", value=v))
        return None
    if isinstance(v, (int, float)):
        try:
            f = float(v)
        except OverflowError:  # an integer beyond 1e308
            f = math.inf
        if not math.isfinite(f):
            problems.append(problem("nan_value", file, i, fld, value=v))
            return None
        return f
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            problems.append(problem("invalid_field", file, i, fld, f"{fld} must be a number", value=v))
            return None
        if not math.isfinite(f):
            problems.append(problem("nan_value", file, i, fld, value=v))
            return None
        problems.append(problem("mistyped_field", file, i, fld, f"{fld} {v!r} read as {f}", value=v))
        return f if math.isfinite(f) else None
    problems.append(problem("invalid_field", file, i, fld, f"{fld} must be a number", value=v))
    return None


def _bool(v, file, i, fld, problems) -> bool | None:
    if isinstance(v, bool):
        return v
    if v in (0, 1) and type(v) is int:
        problems.append(problem("mistyped_field", file, i, fld, f"{fld} {v!r} read as {bool(v)}", value=v))
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        problems.append(problem("mistyped_field", file, i, fld, f"{fld} {v!r} read as a boolean", value=v))
        return v.strip().lower() == "true"
    if v is None:
        problems.append(problem("missing_field", file, i, fld))
    else:
        problems.append(problem("invalid_field", file, i, fld, f"{fld} must be true or false", value=v))
    return None


def nested_direction(cs: bool | None, cr: bool | None, es: float | None, er: float | None) -> str | None:
    votes = set()
    if cs:
        votes.add("safe" if (es or 0) > 0 else "mixed")
    if cr:
        votes.add("risky" if (er or 0) > 0 else "mixed")
    if not votes:
        return None
    return votes.pop() if len(votes) == 1 else "mixed"


def normalise(r, file: str, i: int, problems: list, n_trials: int | None) -> dict | None:
    """The record's row, or None when it cannot be used (its problems appended). Isolated:
    an unexpected exception is this record's `invalid_field` problem, never the file's."""
    try:
        return _normalise(r, file, i, problems, n_trials)
    except Exception as exc:  # noqa: BLE001 - anything the data can hold is a problem row
        problems.append(problem("invalid_field", file, i, None, f"record could not be read ({type(exc).__name__}: "
                                f"{exc})"[:300]))
        return None


def _normalise(r, file: str, i: int, problems: list, n_trials: int | None) -> dict | None:
    if r is LOST:  # a broken record, already reported by the reader
        return None
    if not isinstance(r, dict):
        problems.append(problem("record_not_object", file, i, None, value=r))
        return None
    schema = detect_schema(r)
    if schema is None:
        problems.append(problem("unknown_schema", file, i, None, value=sorted(r)[:12]))
        return None
    name = r.get("feature")
    if "feature" not in r:
        problems.append(problem("missing_field", file, i, "feature"))
        return None
    if not isinstance(name, str):
        problems.append(problem("invalid_field", file, i, "feature", "feature must be a string", value=name))
        return None
    if has_surrogate(name):  # not a valid name anyway; shown writable
        problems.append(problem("lone_surrogate", file, i, "feature", value=name))
    m = FEATURE_ID_RE.match(name)
    if not m or name != name.strip():
        problems.append(problem("malformed_feature", file, i, "feature", value=name))
        return None
    n_layer, n_fid = int(m.group(1)), int(m.group(2))
    out = {"feature": name, "schema": schema, "source_file": file, "record": i, "n_trials_per_condition": n_trials}
    for fld, from_name in (("layer", n_layer), ("feature_id", n_fid)):
        if fld not in r:
            problems.append(problem("missing_field", file, i, fld, f"{fld} missing; taken from the name {name}"))
            out[fld] = from_name
            continue
        v = _int(r[fld], file, i, fld, problems)
        if v is None:
            return None
        if v != from_name:  # kept under its name (what the logs and the selection use), flagged
            problems.append(problem("layer_mismatch", file, i, fld, f"{fld} {v} but the name says {from_name} ({name}); "
                                    f"kept as {name}", value=r[fld]))
            v = from_name
        out[fld] = v
    if "cohen_d" not in r:
        problems.append(problem("missing_field", file, i, "cohen_d"))
    out["cohen_d"] = _num(r.get("cohen_d"), file, i, "cohen_d", problems)
    out.update(classified_as=None, interpretation=None, safe_effect=None, risky_effect=None, safe_p_value=None,
               risky_p_value=None, safe_bet_delta=None, risky_bet_delta=None, checkpoint_direction=None)
    if schema == CHECKPOINT_SCHEMA_NESTED:
        c = r["causality"]
        cs = _bool(c.get("is_causal_safe"), file, i, "causality.is_causal_safe", problems)
        cr = _bool(c.get("is_causal_risky"), file, i, "causality.is_causal_risky", problems)
        out["checkpoint_verdict"] = None if cs is None and cr is None else bool(cs or cr)
        for dst, src in (("safe_effect", "safe_effect_size"), ("risky_effect", "risky_effect_size"),
                         ("safe_p_value", "safe_p_value"), ("risky_p_value", "risky_p_value")):
            out[dst] = _num(c.get(src), file, i, f"causality.{src}", problems)
        interp = c.get("interpretation")
        out["interpretation"] = clean_text(interp) if isinstance(interp, str) else None
        out["checkpoint_direction"] = nested_direction(cs, cr, out["safe_effect"], out["risky_effect"])
    else:
        out["checkpoint_verdict"] = _bool(r.get("is_causal"), file, i, "is_causal", problems)
        if schema == CHECKPOINT_SCHEMA_FLAT:
            for dst, src in (("safe_effect", "safe_stop_delta"), ("risky_effect", "risky_stop_delta"),
                             ("safe_p_value", "safe_p_value"), ("risky_p_value", "risky_p_value"),
                             ("safe_bet_delta", "safe_bet_delta"), ("risky_bet_delta", "risky_bet_delta")):
                out[dst] = _num(r.get(src), file, i, src, problems)
            cls = r.get("classified_as")
            out["classified_as"] = clean_text(cls) if isinstance(cls, str) else None
            if out["checkpoint_verdict"] and cls in ("safe", "risky"):
                out["checkpoint_direction"] = cls
    return out


# Cumulative checkpoints repeat each record in every later file, byte for byte: a record's
# normalised row and problems are computed once per distinct text and reused (per process;
# cleared at the start of each audit).
_SEEN: dict[bytes, tuple[dict | None, list[tuple]]] = {}
_SEEN_MAX = 500_000

try:
    import msgspec

    class _CheckpointTop(msgspec.Struct, gc=False):
        results: list[msgspec.Raw]
        timestamp: object = None
        process_id: object = None
        layer_range: object = None
        features_tested: object = None
        n_trials_per_condition: object = None

    _TOP = msgspec.json.Decoder(_CheckpointTop)
except ImportError:  # pragma: no cover
    msgspec = None


def clear_cache() -> None:
    _SEEN.clear()


def _normalise_cached(raw, name: str, i: int, problems: list) -> dict | None:
    """The normalised row of a record (shared between its copies: not to be modified), its
    problems appended with this file and index."""
    import orjson

    key = bytes(raw)
    hit = _SEEN.get(key)
    if hit is None:
        probs: list[tuple] = []
        try:
            rec = orjson.loads(key)
        except (orjson.JSONDecodeError, RecursionError, ValueError):  # invalid UTF-8, lone surrogates, ...
            rec = _decode_record(key, probs)
        row = normalise(rec, "", 0, probs, None)
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        hit = _SEEN[key] = (row, probs)
    row, probs = hit
    for p in probs:
        problems.append((p[0], p[1], name, i, p[4], p[5], p[6]))
    return row


def _decode_record(key: bytes, probs: list):
    """One record that orjson refused: bad bytes replaced by U+FFFD and lone surrogates by
    U+FFFD (each flagged), read by Python's json (NaN literals as NaN); LOST when broken."""
    import json

    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = key.decode("utf-8", errors="replace")
        probs.append(problem("invalid_utf8", "", 0, None, f"invalid UTF-8 at byte {exc.start} of the record; "
                             "replaced by U+FFFD", value=key[exc.start:exc.start + 8].hex()))
    try:
        rec = json.loads(text)
    except RecursionError:
        probs.append(problem("too_deep", "", 0, None))
        return LOST
    except ValueError as exc:
        probs.append(problem("corrupt_record", "", 0, None, f"record not readable: {exc}"[:300]))
        return LOST
    if "\\u" in text and isinstance(rec, dict):
        _clean_surrogates(rec, probs)
    return rec


def _clean_surrogates(rec: dict, probs: list) -> None:
    """Lone surrogates in a record's text fields (one level of nesting): replaced, flagged."""
    for k, v in list(rec.items()):
        if isinstance(v, str) and has_surrogate(v):
            probs.append(problem("lone_surrogate", "", 0, clean_text(k), value=v))
            rec[k] = clean_text(v)
        elif isinstance(v, dict):
            for k2, v2 in list(v.items()):
                if isinstance(v2, str) and has_surrogate(v2):
                    probs.append(problem("lone_surrogate", "", 0, f"{clean_text(k)}.{clean_text(k2)}", value=v2))
                    v[k2] = clean_text(v2)


def _read_checkpoint(path: str, name: str, problems: list) -> tuple[int, dict, int | None, list]:
    """(records read, header, n_trials_per_condition, [(normalised row, record index)]) of one
    file; its problems are appended."""
    try:
        raw = _read_regular(path)
    except OSError as exc:
        problems.append(problem("unreadable_file", name, message=str(exc)))
        return 0, {}, None, []
    top = None
    if msgspec is not None and raw.strip() and not raw.startswith(b"\xef\xbb\xbf"):
        try:
            top = _TOP.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
            top = None
    rows = []
    if top is not None:  # clean file: records checked once per distinct text
        header = {k: getattr(top, k) for k in ("timestamp", "process_id", "layer_range", "features_tested",
                                                "n_trials_per_condition")}
        n_trials = _header_n(header, name, problems)
        for i, r in enumerate(top.results):
            row = _normalise_cached(r, name, i, problems)
            if row is not None:
                rows.append((row, i))
        return len(top.results), header, n_trials, rows
    return _read_tolerant(raw, name, problems)


def _read_tolerant(raw: bytes, name: str, problems: list) -> tuple[int, dict, int | None, list]:
    loaded = load_tolerant(raw, name, "checkpoint")
    problems.extend(loaded.problems)
    header, recs = loaded.header, loaded.records or []
    n_trials = _header_n(header, name, problems)
    rows = []
    for i, r in enumerate(recs):
        if isinstance(r, dict):
            _clean_surrogates_named(r, name, i, problems)
        row = normalise(r, name, i, problems, n_trials)
        if row is not None:
            rows.append((row, i))
    return len(recs), header, n_trials, rows


def _clean_surrogates_named(rec: dict, name: str, i: int, problems: list) -> None:
    probs: list[tuple] = []
    _clean_surrogates(rec, probs)
    problems.extend((p[0], p[1], name, i, p[4], p[5], p[6]) for p in probs)


def _read_regular(path: str) -> bytes:
    """The file's bytes; opened without blocking and refused unless a regular file."""
    import os
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb", buffering=0) as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(f"not a regular file: {path}")
        return fh.read()


def _read_checkpoint_isolated(path: str, name: str, problems: list) -> tuple[int, dict, int | None, list]:
    """`_read_checkpoint`, with an unexpected exception retried on the tolerant path and, if
    that fails too, reported as this file's `read_failed` (the other files go on)."""
    mark = len(problems)
    try:
        return _read_checkpoint(path, name, problems)
    except Exception as first:  # noqa: BLE001
        del problems[mark:]
        try:
            out = _read_tolerant(_read_regular(path), name, problems)
        except Exception as exc:  # noqa: BLE001
            del problems[mark:]
            problems.append(problem("read_failed", name, message=f"{type(exc).__name__}: {exc}"[:300]))
            return 0, {}, None, []
        problems.append(problem("read_failed", name, message=f"the fast reader failed ({type(first).__name__}: "
                                f"{first}); read record by record instead"[:300]))
        return out


def audit_checkpoint_files(files: list[tuple[str, str, int, str, str]]) -> dict:
    """Every checkpoint file, (path, name, file rank, file timestamp, run id), read oldest first
    in one task and folded as it goes: per (layer, feature_id) the valid copy with the largest
    (file rank, record index) wins. Only the winners become full rows, so the parent receives
    one row per feature instead of one per copy."""
    import collections

    t0 = time.perf_counter()
    clear_cache()
    problems: list[tuple] = []
    newest: dict[tuple[int, int], tuple] = {}
    schema_counts: collections.Counter = collections.Counter()
    headers_n: collections.Counter = collections.Counter()
    records_read = valid = 0
    per_file = []
    for path, name, _rank, ts, run_id in sorted(files, key=lambda f: f[2]):
        n_records, header, n_trials, rows = _read_checkpoint_isolated(path, name, problems)
        records_read += n_records
        if n_trials is not None:
            headers_n[n_trials] += 1
        lr = _layer_range(header.get("layer_range"), name)
        valid += len(rows)
        per_file.append({"file": name, "role": "checkpoint", "records": n_records, "valid": len(rows)})
        for row, i in rows:  # ascending (rank, record): each valid copy supersedes the ones before
            schema_counts[row["schema"]] += 1
            if lr is not None and not lr[0] <= row["layer"] <= lr[1]:
                problems.append(problem("outside_layer_range", name, i, "layer",
                                        f"{row['feature']} is outside the file's layers L{lr[0]}-L{lr[1]}; kept",
                                        value=row["layer"]))
            newest[(row["layer"], row["feature_id"])] = (row, name, i, n_trials, ts, run_id)
    rows_out = {key: {**row, "source_file": name, "record": i, "n_trials_per_condition": n_trials,
                      "file_timestamp": ts, "run_id": run_id}
                for key, (row, name, i, n_trials, ts, run_id) in newest.items()}
    clear_cache()
    return {"problems": problems, "newest": rows_out, "files": len(files), "records_read": records_read,
            "valid": valid, "schema_counts": schema_counts, "headers_n": headers_n, "per_file": per_file,
            "seconds": time.perf_counter() - t0}


_LAYER_RANGE_RE = __import__("re").compile(r"^L(\d{1,3})-L?(\d{1,3})$", __import__("re").ASCII)
_NAME_RANGE_RE = __import__("re").compile(r"^checkpoint_L(\d{1,3})_(\d{1,3})_", __import__("re").ASCII)


def _layer_range(value, name: str) -> tuple[int, int] | None:
    """The file's layers: its header's `layer_range` ("L1-L2"), else the name's `checkpoint_L1_2_`."""
    m = _LAYER_RANGE_RE.match(value) if isinstance(value, str) else None
    m = m or _NAME_RANGE_RE.match(name)
    if not m:
        return None
    a, b = int(m.group(1)), int(m.group(2))
    return (a, b) if a <= b else None


def _header_n(header: dict, name: str, problems: list) -> int | None:
    """The header's n_trials_per_condition when it is a usable count (1..1,000,001), else None
    (reported)."""
    n = header.get("n_trials_per_condition")
    if n is None:
        return None
    if type(n) is not int:
        n = _int(n, name, None, "n_trials_per_condition", problems)
    if n is not None and not 1 <= n <= 1_000_001:
        problems.append(problem("invalid_field", name, None, "n_trials_per_condition",
                                "n_trials_per_condition must be a count of trials", value=n))
        return None
    return n
