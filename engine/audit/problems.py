"""Problem kinds the audit reports: one row each in problems.parquet.

severity: `error` (a file or record could not be used as it is; `validated` is false),
`warning` (used, but suspicious or incomplete), `info` (counted for the record, e.g. restart
duplicates superseded by a newer copy).
"""

from __future__ import annotations

import re

KINDS: dict[str, tuple[str, str]] = {
    # files
    "no_files": ("error", "no file of this kind matched the patterns"),
    "not_a_file": ("error", "a directory, FIFO, socket, dangling link or symlink loop named like a data file; not read"),
    "unreadable_file": ("error", "the file could not be read"),
    "read_failed": ("error", "reading the file failed unexpectedly (the detail says why); its records could not be used"),
    "empty_file": ("error", "the file is empty"),
    "not_json": ("error", "the file is not JSON; nothing recovered"),
    "truncated_file": ("error", "the JSON ends early; the records before the break were recovered"),
    "corrupt_json": ("error", "the JSON breaks in the middle; the records before the break (and after it, "
                              "where reading could resume at a record) were recovered"),
    "object_not_array": ("error", "a response log holds an object where an array of records belongs"),
    "array_not_object": ("warning", "a checkpoint holds an array; read as its results"),
    "bom": ("warning", "UTF-8 byte-order mark at the start of the file (ignored)"),
    "invalid_utf8": ("warning", "bytes that are not UTF-8; replaced by U+FFFD"),
    "lone_surrogate": ("warning", "a \\udXXX escape that is half of a UTF-16 pair; replaced by U+FFFD, record kept"),
    "too_deep": ("error", "JSON nested too deeply to read (thousands of levels); that part skipped"),
    "nan_literal": ("warning", "NaN/Infinity literals (Python's json.dump writes them; JSON has none)"),
    "no_timestamp": ("warning", "no YYYYMMDD_HHMMSS in the file name; the file's mtime orders it"),
    "mixed_runs": ("warning", "the files come from separate runs; pick one with --run or --since/--until"),
    # records
    "record_not_object": ("error", "a record that is not a JSON object"),
    "corrupt_record": ("error", "a record whose JSON is broken; skipped, reading goes on at the next record"),
    "missing_field": ("error", "a required field is missing"),
    "invalid_field": ("error", "a field has a value of the wrong type that cannot be read"),
    "mistyped_field": ("warning", "a field has the wrong JSON type but a readable value (e.g. \"7\"); converted"),
    "nan_value": ("warning", "a numeric field is NaN or infinite"),
    "malformed_feature": ("error", "the feature name is not L<layer>-<index>"),
    "layer_mismatch": ("warning", "the record's layer or feature_id disagrees with its feature name; kept under the name"),
    "outside_layer_range": ("warning", "a checkpoint record's layer is outside the file's layer range; kept"),
    "unknown_schema": ("error", "a checkpoint record in none of the three known schemas"),
    "unknown_condition": ("error", "a condition outside the configured list"),
    "empty_response": ("warning", "an empty response (kept; parses as invalid)"),
    "absurd_bet": ("warning", "the study's parsed bet is neither 0 nor within [min_bet, max_bet]"),
    "trial_out_of_range": ("warning", "trial index outside 0..n_trials_per_condition-1"),
    "duplicate_trials": ("info", "trials superseded by a newer copy of the same (feature, condition, trial)"),
    # features
    "missing_conditions": ("warning", "a feature lacks trials in some configured conditions"),
    "too_few_trials": ("warning", "a feature x condition has fewer trials than n_trials_per_condition"),
    "feature_without_checkpoint": ("warning", "a feature in the response logs with no checkpoint record"),
    "checkpoint_without_trials": ("warning", "a checkpoint record whose feature has no trials in the logs"),
}

COLUMNS = ("kind", "severity", "file", "record", "field", "message", "value")

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(s: str) -> str:
    """`s` with lone surrogates (from a "\\udcff" escape, or a file name that is not UTF-8)
    replaced by U+FFFD: UTF-8 writers (pyarrow, orjson) refuse them."""
    if s.isascii():
        return s
    return _SURROGATE.sub("\ufffd", s)


def has_surrogate(s: str) -> bool:
    return not s.isascii() and _SURROGATE.search(s) is not None


def problem(kind: str, file: str | None, record: int | None = None, field: str | None = None,
            message: str = "", value=None) -> tuple:
    """One problem row; `value` is stored as text (the offending value, shortened). Text is
    made writable (lone surrogates replaced) and values of any size or depth are shown safely."""
    sev = KINDS[kind][0]
    if value is not None:
        if not isinstance(value, str):
            try:
                value = repr(value)
            except (RecursionError, ValueError):  # nested thousands deep; an int of 5,000+ digits
                value = f"<{type(value).__name__}>"
        if len(value) > 200:
            value = value[:197] + "..."
        value = clean_text(value)
    msg = clean_text(message or KINDS[kind][1])
    return (kind, sev, clean_text(file) if file else file, record, clean_text(field) if field else field, msg, value)
