"""Reading JSON that may be damaged, without losing the valid records around the damage.

`load_tolerant(raw, file, role)` returns the records of a file (a response log's array, a
checkpoint's `results`) plus its header and the problems met on the way:
empty file, UTF-8 BOM, invalid UTF-8 (replaced by U+FFFD), NaN/Infinity literals (read as
NaN, as Python's json does), a truncated or broken array (the records before the break are
recovered one by one with `raw_decode`), an object where an array belongs (its list of
records is used), and text that is not JSON at all. The fast path (orjson or msgspec) is
tried first by the callers; this module is the slow path for files that fail it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from engine.audit.problems import problem

BOM = b"\xef\xbb\xbf"
_ARRAY_KEY = re.compile(r'"(results|responses|trials|records|data)"\s*:\s*\[')
_HEADER_INT = re.compile(r'"(n_trials_per_condition|features_tested|gpu_id)"\s*:\s*(\d+)')
_HEADER_STR = re.compile(r'"(timestamp|process_id|layer_range)"\s*:\s*"([^"\\]*)"')
_WS = " \t\r\n"


class _Lost:
    """Stands in the records list for a record that could not be decoded (already reported as
    corrupt_record/too_deep), so that later records keep their index and it counts as read."""

    def __repr__(self) -> str:
        return "<broken record>"


LOST = _Lost()


@dataclass
class Loaded:
    records: list | None  # None: nothing usable
    header: dict = field(default_factory=dict)
    problems: list[tuple] = field(default_factory=list)
    utf8_replaced: bool = False


class _NaNCounter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, name: str) -> float:
        self.n += 1
        return float(name.replace("Infinity", "inf"))


def _records_from_top(top: Any, file: str, role: str, out: Loaded) -> None:
    if role == "responses":
        if isinstance(top, list):
            out.records = top
            return
        if isinstance(top, dict):
            lists = [(k, v) for k, v in top.items() if isinstance(v, list)]
            if "feature" in top and "condition" in top:
                out.records = [top]
                out.problems.append(problem("object_not_array", file, message="a single record instead of an array; read as one record"))
            elif len(lists) == 1:
                out.records = lists[0][1]
                out.problems.append(problem("object_not_array", file, field=lists[0][0],
                                            message=f"an object instead of an array; read the records under {lists[0][0]!r}"))
            else:
                out.records = None
                out.problems.append(problem("object_not_array", file, message="an object instead of an array; no record list found in it"))
            return
        out.problems.append(problem("object_not_array", file, message=f"top level is {type(top).__name__}, not an array"))
        return
    # checkpoints
    if isinstance(top, dict):
        out.header = {k: v for k, v in top.items() if k != "results"}
        res = top.get("results")
        if res is None:
            out.problems.append(problem("missing_field", file, field="results", message="checkpoint has no 'results'"))
        elif not isinstance(res, list):
            out.problems.append(problem("invalid_field", file, field="results", message="'results' is not an array",
                                        value=type(res).__name__))
        else:
            out.records = res
        return
    if isinstance(top, list):
        out.records = top
        out.problems.append(problem("array_not_object", file))
        return
    out.problems.append(problem("not_json", file, message=f"top level is {type(top).__name__}"))


def _recover(text: str, file: str, role: str, err: json.JSONDecodeError, nan: _NaNCounter, out: Loaded) -> None:
    """Decode the records array element by element up to the first break."""
    start = len(text) - len(text.lstrip(_WS))
    if start >= len(text) or text[start] not in "[{":
        out.problems.append(problem("not_json", file, message=f"not JSON ({err.msg} at char {err.pos})"))
        return
    if text[start] == "[":
        pos = start + 1
        key = None
    else:
        m = _ARRAY_KEY.search(text)
        if not m:
            out.problems.append(problem("corrupt_json", file, message=f"{err.msg} at char {err.pos}; no record array found"))
            return
        key = m.group(1)
        pos = m.end()
        prefix = text[: m.start()]
        out.header = {k: int(v) for k, v in _HEADER_INT.findall(prefix)}
        out.header.update(dict(_HEADER_STR.findall(prefix)))
        if role == "responses":
            out.problems.append(problem("object_not_array", file, field=key,
                                        message=f"an object instead of an array; read the records under {key!r}"))
    dec = json.JSONDecoder(parse_constant=nan)
    records: list = []
    n = len(text)
    broke_at = None
    lost: list[tuple[int, int, str]] = []  # (record index, char, why) of each skipped record
    junk: list[int] = []  # chars where text between records was skipped
    while True:
        while pos < n and text[pos] in _WS:
            pos += 1
        if pos < n and text[pos] == "]":
            break
        why = None
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            why = e.msg
        except RecursionError:
            why = "nested too deeply"
        if why is not None:
            nxt = _resync(text, pos, dec)
            if nxt is None:
                broke_at = pos
                break
            lost.append((len(records), pos, why))
            records.append(LOST)
            pos = nxt
            continue
        records.append(obj)
        pos = end
        while pos < n and text[pos] in _WS:
            pos += 1
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            break
        nxt = _resync(text, pos - 1, dec)  # text after a record: skip it if a record follows
        if nxt is None:
            broke_at = pos
            break
        junk.append(pos)
        pos = nxt
    out.records = records
    for idx, at, why in lost:
        kind = "too_deep" if why == "nested too deeply" else "corrupt_record"
        out.problems.append(problem(kind, file, record=idx, message=f"record broken at char {at} ({why}); "
                                    "skipped to the next record"))
    for at in junk:
        out.problems.append(problem("corrupt_json", file, message=f"unexpected text at char {at} between records; "
                                    "skipped to the next record"))
    if broke_at is None and (lost or junk):
        return  # the array was read to its end around the skipped records
    truncated = not text.rstrip(_WS).endswith(("]", "}"))
    where = f"at char {broke_at}" if broke_at is not None else f"({err.msg} at char {err.pos})"
    kind = "truncated_file" if truncated else "corrupt_json"
    msg = (f"JSON ends early {where}; recovered {len(records)} records before the break" if truncated
           else f"JSON breaks {where}; recovered {len(records)} records before the break")
    out.problems.append(problem(kind, file, record=len(records), message=msg))


_NEXT = re.compile(r",[ \t\r\n]*\{")


def _resync(text: str, pos: int, dec: json.JSONDecoder) -> int | None:
    """Start of the next record that decodes after a broken one at `pos` (a `{` after a
    comma, followed by `,` or `]`), or None: one damaged record costs that record only."""
    n = len(text)
    for m in _NEXT.finditer(text, pos + 1):
        start = m.end() - 1
        try:
            obj, end = dec.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError):
            continue
        while end < n and text[end] in _WS:
            end += 1
        if isinstance(obj, dict) and (end >= n or text[end] in ",]"):
            return start
    return None


def load_tolerant(raw: bytes, file: str, role: str) -> Loaded:
    out = Loaded(None)
    if not raw.strip():
        out.problems.append(problem("empty_file", file, message=f"{len(raw)} bytes, no content"))
        return out
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
        out.problems.append(problem("bom", file))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        out.utf8_replaced = True
        out.problems.append(problem("invalid_utf8", file, message=f"invalid UTF-8 at byte {exc.start}; replaced by U+FFFD",
                                    value=raw[exc.start:exc.start + 8].hex()))
    nan = _NaNCounter()
    try:
        top = json.loads(text, parse_constant=nan)
    except json.JSONDecodeError as err:
        _recover(text, file, role, err, nan, out)
    except RecursionError:  # thousands of levels: read what can be read record by record
        _recover(text, file, role, json.JSONDecodeError("nested too deeply", text, 0), nan, out)
    else:
        _records_from_top(top, file, role, out)
    if nan.n:
        out.problems.append(problem("nan_literal", file, message=f"{nan.n} NaN/Infinity literal(s)", value=nan.n))
    return out
