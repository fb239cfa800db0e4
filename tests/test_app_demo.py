"""The home page on a cache holding the embedded demo: it says plainly that this is the demo
model (not LLaMA-3.1-8B), shows what it learned from `demo/DEMO.json` (numbers recomputed
here from the marker's raw counts), how to point the tool at real data, and survives a
marker that says the model did not learn, holds no causal feature, or is corrupt."""

from __future__ import annotations

import json

import pytest
import yaml

from explorer_fixtures import app_test, cache_copy, metrics, no_exception, read, small_cache, texts  # noqa: F401

BANNER = "This is the embedded demo, not LLaMA-3.1-8B"


def all_text(at) -> str:
    kinds = ("markdown", "caption", "success", "error", "warning", "info", "code")
    return "\n".join(t for k in kinds for t in texts(at, k))


def frame(at, column: str):
    """The first dataframe on the page holding `column` (Stylers unwrapped)."""
    for el in at.dataframe:
        df = getattr(el.value, "data", el.value)
        if column in df.columns:
            return df
    raise AssertionError(f"no table with a {column!r} column")


def stop_rate(r: dict) -> float | None:
    """Stops over valid answers, from the raw counts (None without a valid answer)."""
    return r["stops"] / r["valid"] if r["valid"] else None


def same(shown: str, expected: float | None) -> bool:
    """A rate shown with two decimals, "–" when there is none."""
    return shown == ("–" if expected is None else f"{expected:.2f}")


def check_real_data_hint(at) -> None:
    """The YAML shown names the keys to set, and the config loader knows each of them."""
    from engine.config import Config

    code = texts(at, "code")
    shown = yaml.safe_load(next(c for c in code if "name_or_path" in c))
    assert shown["model"]["name_or_path"] == "meta-llama/Llama-3.1-8B"
    assert shown["sae"]["source"].startswith("fnlp/Llama3_1-8B-Base-L")  # LlamaScope
    assert shown["data"]["checkpoints_dir"].endswith("experiment_2_multilayer_patching")
    assert shown["data"]["responses_dir"].endswith("response_logs")
    fields = Config.__dataclass_fields__
    for section, keys in shown.items():
        if isinstance(keys, dict):
            sub = fields[section].default_factory().__dataclass_fields__
            assert set(keys) <= set(sub), (section, set(keys) - set(sub))
        else:
            assert section in fields
    commands = next(c for c in code if "engine run" in c)
    assert "python -m engine run --config config.yaml" in commands
    assert "python -m engine explore --config config.yaml" in commands


# ---------------------------------------------------------------------------
# The shortened demo's real cache
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_home_on_the_demo_cache(monkeypatch, demo_cache):
    from engine.schema import DEMO_MARKER

    marker = read(demo_cache / DEMO_MARKER)
    at = app_test(monkeypatch, demo_cache / marker["config"], demo_cache).run()
    no_exception(at)
    text = all_text(at)
    assert BANNER in text and "random" not in text.lower()
    assert f"{marker['model']['n_layers']} layers, d_model {marker['model']['d_model']}" in text

    # Decision rates on the two prompts, trained vs untrained, from the raw counts.
    rates = frame(at, "stop_safe").set_index("model")
    for model in ("trained", "untrained"):
        r = marker["decision_rates"][model]
        assert same(rates.loc[model, "stop_safe"], stop_rate(r["safe"])), model
        assert same(rates.loc[model, "stop_risky"], stop_rate(r["risky"])), model
        bet = f"${r['risky']['mean_bet']:.2f}" if r["risky"]["valid"] else "–"
        assert rates.loc[model, "mean_bet_risky"] == bet, model
        assert rates.loc[model, "valid"] == (f"{r['safe']['valid']}/{r['safe']['n']} · "
                                             f"{r['risky']['valid']}/{r['risky']['n']}")
    # The learned verdict: a one-sided Fisher's exact test recomputed from the counts.
    from scipy import stats

    s, k = marker["decision_rates"]["trained"]["safe"], marker["decision_rates"]["trained"]["risky"]
    p = stats.fisher_exact([[s["stops"], s["valid"] - s["stops"]], [k["stops"], k["valid"] - k["stops"]]],
                           alternative="greater")[1]
    ok = bool(p < 0.01 and s["valid"] >= 0.8 * s["n"] and k["valid"] >= 0.8 * k["n"])
    assert marker["learned"]["ok"] is ok
    verdict = (texts(at, "success") if ok else texts(at, "error"))[0]
    assert verdict.startswith("It learned the gamble" if ok else "The model did NOT learn") and f"p = {p:.2g}" in verdict
    assert f"stop rate {s['stops'] / s['valid']:.2f} on the safe prompt vs {k['stops'] / k['valid']:.2f}" in verdict

    # Causal features: the count is the number of checkpoint records flagged causal, named by rule.
    e2 = marker["experiment_2"]
    causal = {rec["feature"] for rec in _checkpoint_records(demo_cache) if rec["is_causal"]}
    assert causal == set(e2["causal_features"]) and len(causal) == e2["n_causal"]
    assert metrics(at)[f"Run A's rule of {e2['features_tested']}"] == str(len(causal))
    if causal:
        assert "By **Run A's in-script rule** (uncorrected" in text
        for f in e2["causal_features"][:12]:
            assert f"`{f}`" in text
    assert f"By the study's final rule (Run B): {e2['n_causal_run_b']}" in text
    # The engine's own verdict: the audit's recomputed (BH) count, from its summary file, by direction.
    from engine.schema import AUDIT_VALIDATION

    audit = json.loads((demo_cache / AUDIT_VALIDATION).read_text())["recomputed"]
    assert metrics(at)[f"Engine verdict (BH) of {e2['features_tested']}"] == str(audit["causal"])
    d = audit["by_direction"]
    assert f"**{audit['causal']}** survive the engine's own verdict" in text
    assert f"{d['safe']} safe, {d['risky']} risky, {d['mixed']} mixed" in text
    assert "**risky** = patching it to its bankrupt-game mean" in text
    if not causal and not audit["causal"]:
        assert "No feature was causal by either rule" in text

    # The build's stage times and their total.
    stages = frame(at, "stage")
    shown = dict(zip(stages["stage"], stages["seconds"]))
    assert shown == {**{k.replace("_", " "): v for k, v in marker["stage_seconds"].items()},
                     "total": marker["total_seconds"]}
    check_real_data_hint(at)

    # The step table below still shows the pipeline the demo ran.
    steps = frame(at, "step")
    assert set(steps["status"]) == {"done"}


def _checkpoint_records(cache) -> list[dict]:
    """Every record of the demo's checkpoints; they are cumulative, so the fullest file per
    layer process holds all of that process's features."""
    from pathlib import Path

    from engine.config import load_config
    from engine.schema import DEMO_MARKER

    cfg = load_config(cache / read(cache / DEMO_MARKER)["config"])
    fullest: dict[str, list] = {}
    for path in Path(cfg.data.checkpoints_dir).glob("checkpoint_L*_*.json"):
        obj = read(path)
        if len(obj["results"]) >= len(fullest.get(obj["process_id"], [])):
            fullest[obj["process_id"]] = obj["results"]
    return [rec for recs in fullest.values() for rec in recs]


# ---------------------------------------------------------------------------
# Markers written here: a demo that did not learn, a corrupt marker
# ---------------------------------------------------------------------------


def _marker(**changes) -> dict:
    rates = {
        "trained": {"safe": {"n": 40, "valid": 30, "valid_rate": 0.75, "stops": 12, "stop_rate": 0.4, "mean_bet": 10.0},
                    "risky": {"n": 40, "valid": 36, "valid_rate": 0.9, "stops": 9, "stop_rate": 0.25,
                              "mean_bet": 22.5}},
        "untrained": {"safe": {"n": 40, "valid": 0, "valid_rate": 0.0, "stops": 0, "stop_rate": 0.0, "mean_bet": 0.0},
                      "risky": {"n": 40, "valid": 2, "valid_rate": 0.05, "stops": 1, "stop_rate": 0.5,
                                "mean_bet": 10.0}},
    }
    m = {
        "schema_version": 1, "demo": True, "complete": True, "seed": 7, "minutes": 2.0,
        "model": {"n_layers": 3, "d_model": 32},
        "decision_rates": rates,
        "learned": {"ok": False, "p_value": 0.3125, "message": "the model did NOT learn the gamble: ..."},
        "causal_counts": {"engine_bh": {"n": 0, "by_direction": {"safe": 0, "risky": 0, "mixed": 0}}},
        "experiment_2": {"features_tested": 9, "n_trials": 20, "n_causal": 0, "causal_features": [],
                         "n_causal_run_b": 0, "causal_features_run_b": [],
                         "rule": "Run A's in-script rule: per prompt, ...", "rule_run_b": "Run B: ..."},
        "stage_seconds": {"train": 61.5, "saes": 7.25, "experiment_1": 2.0, "experiment_2": 4.0, "pipeline": 3.0},
        "total_seconds": 77.75,
    }
    m.update(changes)
    return m


def _write_marker(cache, content: str | bytes) -> None:
    from engine.schema import DEMO_MARKER

    path = cache / DEMO_MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def test_home_says_when_the_demo_model_did_not_learn_and_nothing_is_causal(monkeypatch, cache_copy):
    m = _marker()
    _write_marker(cache_copy.cache, json.dumps(m))
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache).run()
    no_exception(at)
    text = all_text(at)
    assert BANNER in text and "3 layers, d_model 32" in text
    assert not texts(at, "success")[:-1]  # only "every step is done" may be green, never the verdict
    err = " ".join(texts(at, "error"))
    assert "did NOT learn the gamble" in err and "p = 0.31" in err
    assert "stop rate 0.40 on the safe prompt vs 0.25 on the risky prompt" in err
    assert "No feature was causal by either rule" in " ".join(texts(at, "warning"))
    assert metrics(at)["Run A's rule of 9"] == "0" and metrics(at)["Engine verdict (BH) of 9"] == "0"
    rates = frame(at, "stop_safe").set_index("model")
    for model in ("trained", "untrained"):
        r = m["decision_rates"][model]
        assert same(rates.loc[model, "stop_safe"], stop_rate(r["safe"])), model
        assert same(rates.loc[model, "stop_risky"], stop_rate(r["risky"])), model
    assert rates.loc["untrained", "mean_bet_risky"] == "$10.00" and rates.loc["trained", "mean_bet_risky"] == "$22.50"
    stages = frame(at, "stage")
    assert dict(zip(stages["stage"], stages["seconds"]))["total"] == 77.75
    assert "seed 7 · `--minutes 2`" in texts(at, "caption")
    check_real_data_hint(at)


def test_home_names_a_later_run_that_replaced_the_demo_results(monkeypatch, cache_copy):
    from engine.schema import CONFIG_SNAPSHOT

    _write_marker(cache_copy.cache, json.dumps(_marker()))
    (cache_copy.cache / CONFIG_SNAPSHOT).write_text("model:\n  name_or_path: meta-llama/Llama-3.1-8B\n")
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache).run()
    no_exception(at)
    assert any("`meta-llama/Llama-3.1-8B`" in w and "demo's own files stay" in w for w in texts(at, "warning"))
    # The demo's own snapshot (its model under demo/model) is not a later run.
    (cache_copy.cache / CONFIG_SNAPSHOT).write_text(f"model:\n  name_or_path: {cache_copy.cache}/demo/model\n")
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache).run()
    assert not any("demo's own files stay" in w for w in texts(at, "warning"))


@pytest.mark.parametrize("content, problem", [
    ("{\"demo\": true, \"decision_rates\": {", "could not be read"),
    ("", "could not be read (the file is empty)"),
    ("[1, 2]", "does not hold a JSON object"),
    (b"\xff\xfe\x00garbage", "could not be read"),
    (json.dumps({"demo": True, "decision_rates": {"trained": "fast", "untrained": {"safe": None}},
                 "learned": [], "experiment_2": {"n_causal": "six", "causal_features": "L1-2"},
                 "stage_seconds": {"train": "slow", "saes": None}, "model": None}), None),
])
def test_home_survives_a_corrupt_or_odd_demo_marker(monkeypatch, cache_copy, content, problem):
    _write_marker(cache_copy.cache, content)
    at = app_test(monkeypatch, cache_copy.config, cache_copy.cache).run()
    no_exception(at)
    assert BANNER in all_text(at)
    warnings = " ".join(texts(at, "warning"))
    if problem:
        assert f"`demo/DEMO.json` {problem}" in warnings and "python -m engine demo --force" in warnings
    else:  # readable but wrong types: shown as unknown, never as numbers
        assert "does not say how many features were causal" in warnings
        assert "does not say whether the model learned" in warnings
        assert metrics(at)["Run A's rule"] == "–" and metrics(at)["Engine verdict (BH)"] == "–"
    assert set(frame(at, "step")["status"]) <= {"done", "missing", "stale", "failed"}  # the rest of the page
    check_real_data_hint(at)
