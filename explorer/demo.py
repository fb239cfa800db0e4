"""The embedded demo's marker (`<cache>/demo/DEMO.json`, written by `python -m engine demo`)
read for the home page: what the demo model learned, how many features were causal and by
which rule, and the build's stage times. No streamlit here.

The marker is read defensively: a missing field shows as "–", a corrupt file gives a
one-line problem, never an exception (the page must render whatever the file holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from engine import schema
from explorer import data
from explorer.context import AppContext

PROMPTS = ("safe", "risky")
MODELS = ("trained", "untrained")

#: What to put in config.yaml to point the tool at the study (the README's "Pointing it at real data").
REAL_DATA_YAML = """\
model:
  name_or_path: meta-llama/Llama-3.1-8B     # or a local folder
sae:
  source: fnlp/Llama3_1-8B-Base-LXR-8x      # LlamaScope; or a local folder in its layout
  convention: study
data:
  checkpoints_dir: /data/llm_addiction/experiment_2_multilayer_patching
  responses_dir: /data/llm_addiction/experiment_2_multilayer_patching/response_logs
cache_dir: cache_llama                      # optional: a cache of its own, the demo's stays as it is
"""
REAL_DATA_COMMANDS = "python -m engine run --config config.yaml\npython -m engine explore --config config.yaml"


@dataclass(frozen=True)
class DemoInfo:
    """The home page's view of DEMO.json; numbers are None where the file lacks them."""

    problem: str | None = None  # the marker could not be read: why
    complete: bool = False
    seed: Any = None
    minutes: float | None = None
    architecture: str | None = None  # "4 layers, d_model 64"
    rates: pd.DataFrame | None = None  # one row per model (trained, untrained)
    learned_ok: bool | None = None
    learned_p: float | None = None
    learned_message: str | None = None
    features_tested: int | None = None
    n_trials: int | None = None
    n_causal: int | None = None
    causal_features: list[str] = field(default_factory=list)
    rule_name: str | None = None  # "Run A's in-script rule"
    rule: str | None = None  # its full statement
    n_causal_run_b: int | None = None
    causal_features_run_b: list[str] = field(default_factory=list)
    rule_run_b: str | None = None
    n_causal_bh: int | None = None  # the engine's recomputed verdict (BH over every test)
    bh_by_direction: dict[str, int] = field(default_factory=dict)  # safe / risky / mixed
    bh_raises_stopping: int | None = None
    bh_raises_betting: int | None = None
    bh_source: str | None = None
    causal_features_bh: list[str] = field(default_factory=list)
    rule_bh: str | None = None
    expected_bh: float | None = None  # the power plan's expectation
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float | None = None
    later_model: str | None = None  # the model of a later `engine run` into this cache, if not the demo's


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _int(x: Any) -> int | None:
    v = _num(x)
    return int(v) if v is not None and v == int(v) else None


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _features(x: Any) -> list[str]:
    return [str(f) for f in x] if isinstance(x, list) else []


def _rates(rates: dict) -> pd.DataFrame | None:
    """Decisions on the two study prompts, one row per model. A stop rate over zero valid
    answers means nothing and is left empty."""
    rows = []
    for model in MODELS:
        r = _dict(rates.get(model))
        if not r:
            continue
        row: dict[str, Any] = {"model": model}
        for prompt in PROMPTS:
            p = _dict(r.get(prompt))
            valid, n = _int(p.get("valid")), _int(p.get("n"))
            row[f"stop_{prompt}"] = _num(p.get("stop_rate")) if valid != 0 else None
            row[f"valid_{prompt}"] = _num(p.get("valid_rate"))
            row[f"n_{prompt}"] = n
            row[f"valid_n_{prompt}"] = valid
        risky = _dict(r.get("risky"))
        row["mean_bet_risky"] = _num(risky.get("mean_bet")) if _int(risky.get("valid")) != 0 else None
        row["big_bet_risky"] = _num(risky.get("big_bet_rate")) if _int(risky.get("valid")) != 0 else None
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


def _later_model(ctx: AppContext) -> str | None:
    """The model named by the cache's config snapshot (written by `engine run`) when it is not
    the demo's own `demo/model`: then the pages show that run's results, not the demo's."""
    import yaml

    path = ctx.cache / schema.CONFIG_SNAPSHOT
    if not path.is_file():
        return None
    try:
        name = _dict(_dict(yaml.safe_load(path.read_text(encoding="utf-8"))).get("model")).get("name_or_path")
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(name, str) or Path(name).parts[-2:] == (schema.DEMO_DIR, "model"):
        return None
    return name


def demo_info(ctx: AppContext) -> DemoInfo | None:
    """The demo marker of this cache, or None when the cache holds no demo."""
    path = ctx.cache / schema.DEMO_MARKER
    st = data.stamp(path)
    if st is None:
        return None
    try:
        raw = data._json_file(str(path), st)
    except (OSError, ValueError) as exc:
        return DemoInfo(problem=f"`{schema.DEMO_MARKER}` could not be read ({data._short_exc(exc)})")
    if not isinstance(raw, dict):
        return DemoInfo(problem=f"`{schema.DEMO_MARKER}` does not hold a JSON object")
    return summarize(raw, _later_model(ctx))


def summarize(raw: dict, later_model: str | None = None) -> DemoInfo:
    model = _dict(raw.get("model"))
    n_layers, d_model = _int(model.get("n_layers")), _int(model.get("d_model"))
    learned = _dict(raw.get("learned"))
    e2 = _dict(raw.get("experiment_2"))
    rule = e2.get("rule") if isinstance(e2.get("rule"), str) else None
    n_causal = _int(e2.get("n_causal"))
    if n_causal is None:
        n_causal = _int(raw.get("n_causal_features"))
    stages = {str(k): v for k, v in _dict(raw.get("stage_seconds")).items() if _num(v) is not None}
    bh = _dict(_dict(raw.get("causal_counts")).get("engine_bh"))
    dirs = {str(k): int(v) for k, v in _dict(bh.get("by_direction")).items() if _int(v) is not None}
    return DemoInfo(
        complete=raw.get("complete") is True,
        seed=raw.get("seed"),
        minutes=_num(raw.get("minutes")),
        architecture=f"{n_layers} layers, d_model {d_model}" if n_layers and d_model else None,
        rates=_rates(_dict(raw.get("decision_rates"))),
        learned_ok=learned.get("ok") if isinstance(learned.get("ok"), bool) else None,
        learned_p=_num(learned.get("p_value")),
        learned_message=learned.get("message") if isinstance(learned.get("message"), str) else None,
        features_tested=_int(e2.get("features_tested")),
        n_trials=_int(e2.get("n_trials")),
        n_causal=n_causal,
        causal_features=_features(e2.get("causal_features")),
        rule_name=rule.split(":", 1)[0].strip() if rule else None,
        rule=rule,
        n_causal_run_b=_int(e2.get("n_causal_run_b")),
        causal_features_run_b=_features(e2.get("causal_features_run_b")),
        rule_run_b=e2.get("rule_run_b") if isinstance(e2.get("rule_run_b"), str) else None,
        n_causal_bh=_int(bh.get("n")),
        bh_by_direction=dirs,
        bh_raises_stopping=_int(bh.get("raises_stopping")),
        bh_raises_betting=_int(bh.get("raises_betting")),
        bh_source=bh.get("source") if isinstance(bh.get("source"), str) else None,
        causal_features_bh=_features(e2.get("causal_features_bh")),
        rule_bh=e2.get("rule_bh") if isinstance(e2.get("rule_bh"), str) else None,
        expected_bh=_num(e2.get("expected_bh_survivors")),
        stage_seconds={k: float(v) for k, v in stages.items()},
        total_seconds=_num(raw.get("total_seconds")),
        later_model=later_model,
    )


def stage_table(info: DemoInfo) -> pd.DataFrame:
    """The build's stages with their wall-clock seconds (and the total)."""
    rows = [{"stage": k.replace("_", " "), "seconds": v} for k, v in info.stage_seconds.items()]
    if info.total_seconds is not None:
        rows.append({"stage": "total", "seconds": info.total_seconds})
    return pd.DataFrame(rows, columns=["stage", "seconds"])
