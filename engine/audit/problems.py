"""Problem kinds the audit reports: one row each in problems.parquet.

severity: `error` (a file or record could not be used as it is; `validated` is false),
`warning` (used, but suspicious or incomplete), `info` (counted for the record, e.g. restart
duplicates superseded by a newer copy).
"""

from __future__ import annotations

KINDS: dict[str, tuple[str, str]] = {
    # files
    "no_files": ("error", "no file of this kind matched the patterns"),
    "unreadable_file": ("error", "the file could not be read"),
    "empty_file": ("error", "the file is empty"),
    "not_json": ("error", "the file is not JSON; nothing recovered"),
    "truncated_file": ("error", "the JSON ends early; the records before the break were recovered"),
    "corrupt_json": ("error", "the JSON breaks in the middle; the records before the break were recovered"),
    "object_not_array": ("error", "a response log holds an object where an array of records belongs"),
    "array_not_object": ("warning", "a checkpoint holds an array; read as its results"),
    "bom": ("warning", "UTF-8 byte-order mark at the start of the file (ignored)"),
    "invalid_utf8": ("warning", "bytes that are not UTF-8; replaced by U+FFFD"),
    "nan_literal": ("warning", "NaN/Infinity literals (Python's json.dump writes them; JSON has none)"),
    "no_timestamp": ("warning", "no YYYYMMDD_HHMMSS in the file name; the file's mtime orders it"),
    "mixed_runs": ("warning", "the files come from separate runs; pick one with --run or --since/--until"),
    # records
    "record_not_object": ("error", "a record that is not a JSON object"),
    "missing_field": ("error", "a required field is missing"),
    "invalid_field": ("error", "a field has a value of the wrong type that cannot be read"),
    "mistyped_field": ("warning", "a field has the wrong JSON type but a readable value (e.g. \"7\"); converted"),
    "nan_value": ("warning", "a numeric field is NaN or infinite"),
    "malformed_feature": ("error", "the feature name is not L<layer>-<index>"),
    "layer_mismatch": ("error", "the record's layer or feature_id disagrees with its feature name"),
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


def problem(kind: str, file: str | None, record: int | None = None, field: str | None = None,
            message: str = "", value=None) -> tuple:
    """One problem row; `value` is stored as text (the offending value, shortened)."""
    sev = KINDS[kind][0]
    if value is not None:
        value = repr(value) if not isinstance(value, str) else value
        if len(value) > 200:
            value = value[:197] + "..."
    return (kind, sev, file, record, field, message or KINDS[kind][1], value)
