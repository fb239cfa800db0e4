"""Tolerant reading: every kind of damaged file, with the records around the damage kept."""

from __future__ import annotations

import json
import math

from engine.audit.checkpoints import detect_schema, nested_direction, normalise
from engine.audit.reader import LOST, load_tolerant

REC = {"feature": "L3-7", "condition": "safe_baseline", "trial": 0, "response": "1\nBet $10"}


def kinds(loaded):
    return [p[0] for p in loaded.problems]


def test_truncated_array_recovers_records_before_the_break():
    body = json.dumps([dict(REC, trial=t) for t in range(5)], indent=2)
    cut = body[: body.index('"trial": 4') + 5]  # inside the fifth record
    out = load_tolerant(cut.encode(), "f.json", "responses")
    assert [r["trial"] for r in out.records] == [0, 1, 2, 3]
    assert kinds(out) == ["truncated_file"]
    assert out.problems[0][3] == 4  # the record index where it broke


def test_break_in_the_middle_costs_that_record_only():
    body = '[{"feature": "L3-7", "trial": 0}, {"feature": oops}, {"trial": 2}]'
    out = load_tolerant(body.encode(), "f.json", "responses")
    # the broken record keeps its place (as LOST) so that the next one is still record 2
    assert out.records == [{"feature": "L3-7", "trial": 0}, LOST, {"trial": 2}]
    assert kinds(out) == ["corrupt_record"] and out.problems[0][3] == 1


def test_garbage_after_or_between_records():
    body = '[{"feature": "L3-7", "trial": 0}, {"trial": 1} oops'
    out = load_tolerant(body.encode(), "f.json", "responses")
    assert out.records == [{"feature": "L3-7", "trial": 0}, {"trial": 1}] and kinds(out) == ["truncated_file"]
    body = '[{"trial": 0}, {"trial": 1} oops, {"trial": 2}]'
    out = load_tolerant(body.encode(), "f.json", "responses")
    assert out.records == [{"trial": 0}, {"trial": 1}, {"trial": 2}] and kinds(out) == ["corrupt_json"]


def test_deep_nesting_loses_the_record_or_the_file_not_the_run():
    deep = "[" * 10000 + "]" * 10000
    body = '[{"trial": 0}, {"x": ' + deep + '}, {"trial": 2}]'
    out = load_tolerant(body.encode(), "f.json", "responses")
    assert out.records == [{"trial": 0}, LOST, {"trial": 2}] and kinds(out) == ["too_deep"]
    for whole in (deep, "[" * 10000):
        out = load_tolerant(whole.encode(), "f.json", "responses")
        assert out.records == [] and kinds(out) in (["corrupt_json"], ["truncated_file"])


def test_empty_and_whitespace_files():
    for raw in (b"", b"  \n"):
        out = load_tolerant(raw, "f.json", "responses")
        assert out.records is None and kinds(out) == ["empty_file"]


def test_object_instead_of_array_uses_its_record_list():
    body = json.dumps({"timestamp": "20251014_000000", "responses": [REC, REC]}).encode()
    out = load_tolerant(body, "f.json", "responses")
    assert len(out.records) == 2 and kinds(out) == ["object_not_array"]
    single = load_tolerant(json.dumps(REC).encode(), "f.json", "responses")
    assert single.records == [REC] and kinds(single) == ["object_not_array"]
    nothing = load_tolerant(b'{"a": 1}', "f.json", "responses")
    assert nothing.records is None and kinds(nothing) == ["object_not_array"]


def test_bom_invalid_utf8_nan_and_not_json():
    bom = load_tolerant(b"\xef\xbb\xbf" + json.dumps([REC]).encode(), "f.json", "responses")
    assert bom.records == [REC] and kinds(bom) == ["bom"]
    bad = json.dumps([dict(REC, response="1 @@")]).encode().replace(b"@@", b"\xff")
    out = load_tolerant(bad, "f.json", "responses")
    assert out.records[0]["response"] == "1 \ufffd" and kinds(out) == ["invalid_utf8"] and out.utf8_replaced
    nan = load_tolerant(b'{"n_trials_per_condition": 30, "results": [{"cohen_d": NaN}, {"cohen_d": -Infinity}]}',
                        "c.json", "checkpoint")
    assert math.isnan(nan.records[0]["cohen_d"]) and nan.records[1]["cohen_d"] == -math.inf
    assert kinds(nan) == ["nan_literal"] and nan.header["n_trials_per_condition"] == 30
    text = load_tolerant(b"Traceback (most recent call last):\n", "f.json", "responses")
    assert text.records is None and kinds(text) == ["not_json"]


def test_truncated_checkpoint_keeps_header_and_results_before_the_break():
    body = json.dumps({"timestamp": "20251014_000000", "n_trials_per_condition": 30,
                       "results": [{"feature": f"L1-{i}", "is_causal": True} for i in range(4)]})
    out = load_tolerant(body[:-30].encode(), "c.json", "checkpoint")
    assert out.header["n_trials_per_condition"] == 30 and len(out.records) == 3
    assert kinds(out) == ["truncated_file"]
    arr = load_tolerant(b'[{"feature": "L1-1", "is_causal": true}]', "c.json", "checkpoint")
    assert len(arr.records) == 1 and kinds(arr) == ["array_not_object"]


def test_checkpoint_schemas_and_their_verdicts():
    plan = {"feature": "L2-5", "layer": 2, "feature_id": 5, "is_causal": True, "cohen_d": 0.5}
    flat = {**plan, "classified_as": "risky", "safe_stop_delta": 0.2, "risky_stop_delta": -0.1,
            "safe_p_value": 0.01, "risky_p_value": 0.3}
    nested = {"feature": "L2-5", "layer": 2, "feature_id": 5, "cohen_d": -0.9,
              "causality": {"is_causal_safe": True, "is_causal_risky": False, "safe_effect_size": 0.23,
                            "risky_effect_size": 0, "safe_p_value": 0.03, "risky_p_value": 1.0,
                            "interpretation": "safe_context_causal"}}
    assert [detect_schema(r) for r in (plan, flat, nested, {"feature": "x"})] == ["plan", "run_a_flat", "run_b_nested", None]
    probs: list = []
    rows = [normalise(r, "c.json", i, probs, 30) for i, r in enumerate((plan, flat, nested))]
    assert probs == []
    assert [r["checkpoint_verdict"] for r in rows] == [True, True, True]
    assert [r["checkpoint_direction"] for r in rows] == [None, "risky", "safe"]
    assert rows[2]["safe_effect"] == 0.23 and rows[1]["safe_effect"] == 0.2
    assert nested_direction(True, True, 0.2, 0.3) == "mixed" and nested_direction(False, True, 0, 0.3) == "risky"
    assert nested_direction(True, False, -0.2, 0) == "mixed" and nested_direction(False, False, 1, 1) is None
    # damaged records: mistyped layer converted, mismatched layer kept under the name, bad names dropped
    probs = []
    assert normalise(dict(plan, layer="2"), "c.json", 0, probs, 30)["layer"] == 2
    kept = normalise(dict(plan, layer=3), "c.json", 1, probs, 30)
    assert (kept["feature"], kept["layer"], kept["feature_id"], kept["checkpoint_verdict"]) == ("L2-5", 2, 5, True)
    assert normalise(dict(plan, feature="L2_5"), "c.json", 2, probs, 30) is None
    assert normalise(dict(plan, cohen_d=float("nan")), "c.json", 3, probs, 30)["cohen_d"] is None
    assert normalise({"feature": "L2-5", "layer": 2}, "c.json", 4, probs, 30) is None
    assert normalise(7, "c.json", 5, probs, 30) is None
    assert [(p[0], p[3], p[4]) for p in probs] == [
        ("mistyped_field", 0, "layer"), ("layer_mismatch", 1, "layer"), ("malformed_feature", 2, "feature"),
        ("nan_value", 3, "cohen_d"), ("unknown_schema", 4, None), ("record_not_object", 5, None)]


def test_response_record_fields_are_converted_or_rejected():
    from engine.audit.responses import _slow_columns

    base = {"feature": "L1-1", "condition": "safe_baseline", "response": "1"}
    recs = [dict(base, trial="7"), dict(base, trial=7.0), dict(base, trial="seven"), dict(base, trial=-3),
            dict(base, trial=10**30), dict(base, trial=True), {**base, "trial": 2, "response": 5},
            {**base, "trial": 3, "parsed": {"bet": float("nan"), "valid": "yes"}}]
    probs: list = []
    cols = _slow_columns(recs, "f.json", probs)
    assert cols["trial"] == [7, 7, 3] and cols["record"] == [0, 1, 7]
    assert cols["study_bet"] == [None, None, None] and cols["study_valid"] == [None, None, None]
    assert [(p[0], p[3], p[4]) for p in probs] == [
        ("mistyped_field", 0, "trial"), ("mistyped_field", 1, "trial"), ("invalid_field", 2, "trial"),
        ("invalid_field", 3, "trial"), ("invalid_field", 4, "trial"), ("invalid_field", 5, "trial"),
        ("invalid_field", 6, "response"), ("absurd_bet", 7, "parsed.bet"), ("mistyped_field", 7, "parsed.valid")]


def test_problem_rows_are_always_writable():
    import orjson
    import pyarrow as pa

    from engine.audit.problems import problem

    deep: list = []
    for _ in range(5000):
        deep = [deep]
    rows = [problem("invalid_field", "f\udcff.json", 1, "x\udcff", "m\ud800", value="v\udfff"),
            problem("invalid_field", "f.json", value=10 ** 5000), problem("invalid_field", "f.json", value=deep)]
    assert rows[0][2] == "f\ufffd.json" and rows[0][4] == "x\ufffd" and rows[0][5] == "m\ufffd" and rows[0][6] == "v\ufffd"
    assert rows[1][6] == "<int>" and rows[2][6] == "<list>"
    for r in rows:  # the writers that refused them before
        pa.array([x for x in r if isinstance(x, str)], pa.string())
        orjson.dumps(list(r))


def test_checkpoint_file_failure_is_isolated(tmp_path, monkeypatch):
    from engine.audit import checkpoints as C

    rec = {"feature": "L2-5", "layer": 2, "feature_id": 5, "is_causal": True, "cohen_d": 0.5}
    files = []
    for k in range(2):
        p = tmp_path / f"checkpoint_L2_2_p_2025101{k}_000000.json"
        p.write_text(json.dumps({"n_trials_per_condition": 30, "results": [dict(rec, feature_id=k, feature=f"L2-{k}")]}))
        files.append((str(p), p.name, k, f"2025101{k}_000000", "r"))
    real = C._read_checkpoint

    def fail_first(path, name, problems):
        if name == files[0][1]:
            problems.append(("junk",))
            raise RuntimeError("boom")
        return real(path, name, problems)

    monkeypatch.setattr(C, "_read_checkpoint", fail_first)
    out = C.audit_checkpoint_files(files)
    assert out["records_read"] == 2 and out["valid"] == 2 and sorted(out["newest"]) == [(2, 0), (2, 1)]
    assert [p[0] for p in out["problems"]] == ["read_failed"] and out["problems"][0][2] == files[0][1]
    monkeypatch.setattr(C, "_read_tolerant", lambda *a: (_ for _ in ()).throw(MemoryError()))
    out = C.audit_checkpoint_files(files)
    assert out["records_read"] == 1 and sorted(out["newest"]) == [(2, 1)]
    assert [p[0] for p in out["problems"]] == ["read_failed"]
