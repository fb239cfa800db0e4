"""Feature ids, atomic writes and versioned artifact reads."""

from __future__ import annotations

import json
import os

import pytest

from engine.errors import UserError
from engine.schema import (SCHEMA_VERSION, FeatureId, atomic_write_json, iter_feature_files, parse_feature_list,
                           pathway_path, read_artifact, with_schema)


def test_feature_ids_round_trip_and_reject_bad_input():
    assert str(FeatureId.parse("L12-3456")) == "L12-3456"
    assert FeatureId.parse(" L0-0 ") == FeatureId(0, 0)
    for bad in ["L12_3456", "12-3456", "L-1-2", "L12-", "L1-2/../../x", "l3-4", "L1-2.json", ""]:
        with pytest.raises(UserError, match="malformed feature id"):
            FeatureId.parse(bad)
    # int() and a plain \\d accept other scripts' digits; feature ids are ASCII only
    for bad in ["L\uff11-3", "L1-\u0663", "L\u0661\u0662-3", "L\u09e7-2", "L1-2\n"[:-1] + "\u0967"]:
        with pytest.raises(UserError, match="in ASCII digits"):
            FeatureId.parse(bad)
    assert [str(f) for f in parse_feature_list("L3-17, L5-2,L3-17")] == ["L3-17", "L5-2"]
    assert sorted([FeatureId(3, 2), FeatureId(1, 9)])[0] == FeatureId(1, 9)


def test_ids_are_validated_before_touching_a_path(tmp_path):
    assert pathway_path(tmp_path, "L3-7") == tmp_path / "pathways" / "L3-7.json"
    with pytest.raises(UserError):
        pathway_path(tmp_path, "../../etc/passwd")


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a" / "b.json"
    atomic_write_json(p, {"x": 1, "nan": float("nan")})
    atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert os.listdir(p.parent) == ["b.json"]
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)  # an ordinary file, not mkstemp's 0600


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "c.json"
    atomic_write_json(p, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": True}
    assert os.listdir(tmp_path) == ["c.json"]


def test_read_artifact_checks_version(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(p, with_schema({"a": 1}))
    assert read_artifact(p, "thing")["a"] == 1 and read_artifact(p, "thing")["schema_version"] == SCHEMA_VERSION
    p.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(UserError, match="schema_version 99.*rebuild it with `python -m engine x`"):
        read_artifact(p, "thing", rebuild="python -m engine x")
    p.write_text('{"truncated": ')
    with pytest.raises(UserError, match="is not valid JSON"):
        read_artifact(p, "thing")


def test_iter_feature_files_ignores_other_names(tmp_path):
    for n in ["L3-7.json", "L10-2.json", "index.json", "L3-x.json", ".L1-1.json.tmp"]:
        (tmp_path / n).write_text("{}")
    assert [str(f) for f, _ in iter_feature_files(tmp_path)] == ["L10-2", "L3-7"]


@pytest.mark.parametrize("content, detail", [
    (b"", "is not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    (b'{"a": "caf\xe9"}', "is not valid JSON (not UTF-8: byte 0xe9 at offset 10)"),
    pytest.param(b"[" * 100000, "is not valid JSON (nested too deeply)", id="deep"),
    pytest.param(b"1" * 5000, "is not valid JSON (Exceeds the limit (4300 digits)", id="5000-digits"),
    (None, "cannot be read (Is a directory)"),
])
def test_read_json_bad_files_one_line(tmp_path, content, detail):
    from engine.schema import read_json

    p = tmp_path / "x.json"
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_json(p, "thing")
    assert str(err.value).startswith(f"thing {p} ") and detail in str(err.value) and "\n" not in str(err.value)


def test_iter_feature_files_ignores_non_ascii_digit_names(tmp_path):
    for name in ("L1-2.json", "L\u0661-2.json", "L1-\uff12.json"):
        (tmp_path / name).write_text("{}")
    assert [str(f) for f, _ in iter_feature_files(tmp_path)] == ["L1-2"]
