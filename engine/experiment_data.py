"""Realistic Experiment-2 data at any scale, in the study's real layouts.

`python scripts/make_experiment_data.py --out DIR --scale tiny|small|full [--config FILE]
[--runs A,B] [--seed K] [--defects]` writes

    DIR/checkpoint_L{a}_{b}_{pid}_{YYYYMMDD_HHMMSS}.json     cumulative checkpoints
    DIR/response_logs/responses_L{a}_{b}_{pid}_{ts}.json    non-cumulative response logs
    DIR/EXPERIMENT.json                                     what was generated (the truth)

as the study's two runs did (experiment_data.md §0, §1.5-§1.7, §2):

* Run A (Oct 2025): 16 processes of two layers, feature ids below 4,096 (the raw residual
  dims it wrongly used), flat checkpoint records (is_causal, classified_as, stop/bet deltas,
  p-values), no resume: a crashed process restarts from scratch, so its re-run writes
  duplicates of (feature, condition, trial); aborted starts left empty checkpoints.
* Run B (Nov 2025): one process per layer, SAE ids, nested `causality` records, resume.

Checkpoints are saved every `save_every` features with the response log of those features,
plus a final checkpoint one second later. Responses imitate the base model: a leading 1 or 2
(sometimes 3 or text), then hallucinated rounds, balances and menus (~100 characters). The
study's parsed fields come from its inline parser P0 (re-implemented in `study_parse`), and
the checkpoint verdicts from each run's in-script rule applied to P0's output, so they carry
the study's biases. `--defects` adds every kind of damage the audit must survive and records
each one in EXPERIMENT.json. With `--config`, features are drawn from layers 1..n_layers-1
and ids below the SAE width of the model the config names (e.g. the fixtures).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.schema import REAL_CONDITIONS, atomic_write_json

SCALES: dict[str, dict] = {
    # layers: how many of the available layers; per_layer: features per layer (capped by the
    # Exp1 counts for Run B at full scale); processes group layers as the study did.
    "tiny": dict(layers=3, per_layer=4, n_trials=5, save_every=3, restarts=1, aborted_starts=1),
    "small": dict(layers=6, per_layer=20, n_trials=10, save_every=10, restarts=2, aborted_starts=2),
    "full": dict(layers=31, per_layer=300, n_trials=30, save_every=50, restarts=13, aborted_starts=9),
}
# Run B's Global-FDR significant features per layer (experiment_data.md §1.1); top-300 of these.
RUN_B_SIGNIFICANT = [96, 108, 167, 213, 260, 322, 396, 442, 427, 486, 505, 497, 627, 715, 570, 547, 521, 493, 463,
                     411, 406, 451, 482, 464, 441, 529, 451, 541, 559, 540, 304]
STUDY_LAYERS, STUDY_D_SAE, STUDY_D_MODEL = 31, 32768, 4096
RUN_START = {"A": dt.datetime(2025, 10, 14, 6, 0, 0), "B": dt.datetime(2025, 11, 12, 9, 0, 0)}
RUN_DAYS = {"A": 7.0, "B": 9.0}
COND_INDEX = {c: i for i, c in enumerate(REAL_CONDITIONS)}

# ---------------------------------------------------------------------------
# The study's inline parser P0 (Exp2 Runs A/B), from experiment_data.md §2.2
# ---------------------------------------------------------------------------
_DOLLAR = re.compile(r"\$(\d+)")
_INT = re.compile(r"\d+")


def study_parse(response: str, run: str) -> dict:
    """P0: stop if "stop" or "2)" anywhere; else the last $N in 5-100; else the first
    integer in 5-100; else invalid (Run A: bet 10 'default_bet'; Run B: stop 0 'parsing_failed')."""
    low = response.lower()
    if "stop" in low or "2)" in response:
        return {"action": "stop", "bet": 0, "valid": True, "response": response}
    amounts = [int(x) for x in _DOLLAR.findall(response) if 5 <= int(x) <= 100]
    if amounts:
        return {"action": "bet", "bet": amounts[-1], "valid": True, "response": response}
    for x in _INT.findall(response):
        if 5 <= int(x) <= 100:
            return {"action": "bet", "bet": int(x), "valid": True, "response": response}
    if run == "A":
        return {"action": "bet", "bet": 10, "valid": False, "response": response, "reason": "default_bet"}
    return {"action": "stop", "bet": 0, "valid": False, "response": response, "reason": "parsing_failed"}


# ---------------------------------------------------------------------------
# Responses in the base model's style
# ---------------------------------------------------------------------------
RISKY_AMOUNTS = np.array([5, 10, 15, 20, 25, 30, 40, 50, 75, 100])
RISKY_AMOUNT_P = np.array([0.12, 0.30, 0.10, 0.18, 0.08, 0.06, 0.04, 0.07, 0.02, 0.03])


def _tail(rng: np.random.Generator, bet: int, balance: int, variable: bool) -> str:
    """Hallucinated continuation: more rounds, balances, an echoed menu."""
    parts = []
    rnd = 4
    for _ in range(int(rng.integers(1, 4))):
        win = rng.random() < 0.3
        balance = max(0, balance - bet + (3 * bet if win else 0))
        parts.append(f"Round {rnd}: Bet ${bet}, {'Win' if win else 'Loss'}, Balance ${balance}")
        rnd += 1
    k = rng.random()
    if k < 0.35:
        parts.append(f"Current balance: ${balance}\nCurrent round: {rnd}")
    elif k < 0.6:
        menu = "1) Bet (choose $5-$100)" if variable else "1) Bet $10"
        parts.append(f"\nChoose:\n{menu}\n2) Stop\n\nChoice: {int(rng.integers(1, 3))}")
    elif k < 0.75:
        parts.append(f"My target is ${int(rng.choice([100, 150, 200, 250, 300]))}.")
    return "\n".join(parts)


def make_response(rng: np.random.Generator, prompt: str, decision: str, amount: int = 10) -> str:
    variable = prompt == "risky"
    balance = 20 if variable else 140
    if decision == "stop":
        k = rng.random()
        if k < 0.35:
            head = f"2\nI stop here and keep my ${balance}."
        elif k < 0.6:
            head = f"2\n\nI will walk away with ${balance}"
        elif k < 0.8:
            head = f"2\nFinal balance: ${balance}"
        elif k < 0.9:
            head = "2) Stop\nGame over. You leave with ${}.".format(balance)
        else:
            head = f"Stop. I'm happy with ${balance}."
        tail = "" if rng.random() < 0.6 else "\n" + _tail(rng, 10, balance, variable)
        return head + tail
    if decision == "bet":
        bet = amount if variable else 10
        k = rng.random()
        if k < 0.3:
            head = f"1\nBet ${bet}"
        elif k < 0.5:
            head = f"1\nBet amount: ${bet}"
        elif k < 0.65:
            head = f"1, ${bet}"
        elif k < 0.8:
            head = f"1\nI'll bet ${bet} and see what happens."
        elif k < 0.9:
            head = "1"
        else:
            head = f"1) Bet ${bet}"
        if variable and head in ("1",):
            head = f"1\nBet ${bet}"
        win = rng.random() < 0.3
        new_balance = max(0, balance - bet + (3 * bet if win else 0))
        result = f"Result: {'Win' if win else 'Loss'}, Balance ${new_balance}"
        return head + "\n" + result + ("\n" + _tail(rng, bet, new_balance, variable) if rng.random() < 0.8 else "")
    # invalid: no usable decision at the start
    k = rng.random()
    if k < 0.4:
        return "3\n" + _tail(rng, 10, balance, variable)
    if k < 0.7:
        return "Slot Machine Game\n\nGame history:\nRound 1: Bet $10, Win, Balance $130"
    return "The odds are against you. " + _tail(rng, 10, balance, variable)


class ResponsePool:
    """Pre-generated responses per (prompt, decision, amount), with P0 parses cached."""

    def __init__(self, seed: int, size: int = 4000):
        rng = np.random.default_rng(seed + 7)
        self.pools: dict[tuple, list[str]] = {}
        for prompt in ("safe", "risky"):
            self.pools[(prompt, "stop", 0)] = [make_response(rng, prompt, "stop") for _ in range(size)]
            self.pools[(prompt, "invalid", 0)] = [make_response(rng, prompt, "invalid") for _ in range(size)]
            if prompt == "safe":
                self.pools[(prompt, "bet", 10)] = [make_response(rng, prompt, "bet", 10) for _ in range(size)]
            else:
                for a in RISKY_AMOUNTS:
                    self.pools[(prompt, "bet", int(a))] = [make_response(rng, prompt, "bet", int(a))
                                                           for _ in range(max(20, size // 2))]
        self._parsed: dict[tuple[str, str], dict] = {}

    def parsed(self, text: str, run: str) -> dict:
        key = (text, run)
        p = self._parsed.get(key)
        if p is None:
            p = self._parsed[key] = study_parse(text, run)
        return p


# ---------------------------------------------------------------------------
# Features and their (latent) behaviour
# ---------------------------------------------------------------------------


@dataclass
class Feature:
    name: str
    layer: int
    feature_id: int
    kind: str  # safe | risky | none
    strength: float
    cohen_d: float


def _stop_invalid_probs(f: Feature, condition: str) -> tuple[float, float, float]:
    """(P(stop | valid), P(invalid), amount shift) of one feature in one condition."""
    prompt, _, patch = condition.partition("_with_")
    patch = patch.replace("_patch", "") if patch else "none"
    base = 0.08 if prompt == "safe" else 0.27
    p_inv = 0.07
    shift = 0.0
    if patch != "none":
        p_inv += 0.03  # the reconstruction error of the patch degrades answers a little
        if f.kind == "safe" and patch == "safe":
            base += f.strength
        elif f.kind == "safe" and patch == "risky":
            base -= f.strength / 3
        elif f.kind == "risky" and patch == "risky":
            base -= f.strength
            shift = f.strength
        elif f.kind == "risky" and patch == "safe":
            base += f.strength / 4
    return float(np.clip(base, 0.01, 0.95)), p_inv, shift


def _draw_features(rng: np.random.Generator, run: str, layers: list[int], per_layer: int, d_sae: int,
                   study: bool) -> list[Feature]:
    out = []
    for layer in layers:
        n = per_layer
        if run == "B" and study and per_layer >= 300:
            n = min(per_layer, RUN_B_SIGNIFICANT[layer - 1])
        space = min(d_sae, STUDY_D_MODEL) if run == "A" else d_sae
        n = min(n, space)
        ids = np.sort(rng.choice(space, size=n, replace=False))
        for fid in ids:
            u = rng.random()
            kind = "risky" if u < 0.35 else ("safe" if u < 0.55 else "none")
            strength = float(rng.uniform(0.3, 0.6)) if kind != "none" else 0.0
            d = float(0.3 + rng.exponential(0.4)) * (1 if rng.random() < 0.55 else -1)
            out.append(Feature(f"L{layer}-{int(fid)}", layer, int(fid), kind, strength, round(d, 4)))
    return out


# ---------------------------------------------------------------------------
# Each run's in-script verdict (experiment_data.md §1.7), on P0's parse
# ---------------------------------------------------------------------------


def _chi2_p(a_yes: int, a_n: int, b_yes: int, b_n: int) -> float:
    from scipy.stats import chi2_contingency, fisher_exact

    table = [[a_yes, a_n - a_yes], [b_yes, b_n - b_yes]]
    try:
        return float(chi2_contingency(table)[1])
    except ValueError:  # a zero row or column: the study fell back to Fisher
        return float(fisher_exact(table)[1])


def run_a_record(f: Feature, parsed: dict[str, list[dict]]) -> dict:
    stop = {c: sum(p["bet"] == 0 for p in v) for c, v in parsed.items()}
    n = {c: len(v) for c, v in parsed.items()}
    bet = {c: float(np.mean([p["bet"] for p in v])) if v else 0.0 for c, v in parsed.items()}
    rate = {c: stop[c] / n[c] if n[c] else 0.0 for c in parsed}
    ds = rate["safe_with_risky_patch"] - rate["safe_with_safe_patch"]
    dr = rate["risky_with_risky_patch"] - rate["risky_with_safe_patch"]
    ps = _chi2_p(stop["safe_with_risky_patch"], n["safe_with_risky_patch"], stop["safe_with_safe_patch"],
                 n["safe_with_safe_patch"])
    pr = _chi2_p(stop["risky_with_risky_patch"], n["risky_with_risky_patch"], stop["risky_with_safe_patch"],
                 n["risky_with_safe_patch"])
    causal = (ps < 0.05 and abs(ds) > 0.1) or (pr < 0.05 and abs(dr) > 0.1)
    cls = ("risky" if (ds > 0 or dr > 0) else "safe") if causal else "neutral"
    return {"safe_stop_delta": round(ds, 4), "risky_stop_delta": round(dr, 4),
            "safe_bet_delta": round(bet["safe_with_risky_patch"] - bet["safe_with_safe_patch"], 4),
            "risky_bet_delta": round(bet["risky_with_risky_patch"] - bet["risky_with_safe_patch"], 4),
            "safe_p_value": ps, "risky_p_value": pr, "classified_as": cls, "is_causal": bool(causal),
            "feature": f.name, "layer": f.layer, "feature_id": f.feature_id, "cohen_d": f.cohen_d}


def run_b_record(f: Feature, parsed: dict[str, list[dict]]) -> dict:
    def cnt(c, pred):
        return sum(1 for p in parsed[c] if pred(p)), len(parsed[c])

    s_b, n_sb = cnt("safe_baseline", lambda p: p["bet"] == 0)
    s_p, n_sp = cnt("safe_with_safe_patch", lambda p: p["bet"] == 0)
    r_b, n_rb = cnt("risky_baseline", lambda p: p["bet"] > 15)
    r_p, n_rp = cnt("risky_with_risky_patch", lambda p: p["bet"] > 15)
    out = {}
    for key, (py, pn, by, bn) in {"safe": (s_p, n_sp, s_b, n_sb), "risky": (r_p, n_rp, r_b, n_rb)}.items():
        eff = (py / pn if pn else 0.0) - (by / bn if bn else 0.0)
        cells = [py, pn - py, by, bn - by]
        p = _chi2_p(py, pn, by, bn) if min(cells) >= 5 else 1.0
        out[key] = (round(eff, 4), p, p < 0.05 and abs(eff) > 0.1)
    cs, cr = out["safe"][2], out["risky"][2]
    interp = ("bidirectional_causal" if cs and cr else "safe_context_causal" if cs
              else "risky_context_causal" if cr else "no_causal_effect")
    return {"feature": f.name, "layer": f.layer, "feature_id": f.feature_id, "cohen_d": f.cohen_d,
            "causality": {"is_causal_safe": bool(cs), "is_causal_risky": bool(cr),
                          "safe_effect_size": out["safe"][0], "risky_effect_size": out["risky"][0],
                          "safe_p_value": out["safe"][1], "risky_p_value": out["risky"][1],
                          "interpretation": interp}}


# ---------------------------------------------------------------------------
# Writing the runs
# ---------------------------------------------------------------------------


def _ts(t: dt.datetime) -> str:
    return t.strftime("%Y%m%d_%H%M%S")


def _dump(obj) -> bytes:
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_INDENT_2)


@dataclass
class Truth:
    """What was written, for tests and benchmarks: per response file the keys of its valid
    records (feature code * 10000 + condition * 1000 + trial) in record order."""

    feature_codes: dict[str, int] = field(default_factory=dict)
    file_keys: dict[str, np.ndarray] = field(default_factory=dict)
    file_time: dict[str, str] = field(default_factory=dict)
    records: int = 0  # records a reader can recover (valid or not)
    invalid_records: int = 0  # records that fail the audit's record checks
    checkpoint_files: list[str] = field(default_factory=list)
    response_files: list[str] = field(default_factory=list)
    checkpoint_features: dict[str, set] = field(default_factory=dict)  # run -> feature names
    checkpoint_records: int = 0
    features: dict[str, int] = field(default_factory=dict)
    problems: dict[str, int] = field(default_factory=dict)
    defects: list[dict] = field(default_factory=list)

    def code(self, feature: str) -> int:
        c = self.feature_codes.get(feature)
        if c is None:
            c = self.feature_codes[feature] = len(self.feature_codes)
        return c

    def keys_of(self, records: list) -> np.ndarray:
        return np.array([self.code(r["feature"]) * 10000 + COND_INDEX[r["condition"]] * 1000 + int(r["trial"])
                         for r in records], dtype=np.int64)

    def add_problem(self, kind: str, n: int = 1) -> None:
        self.problems[kind] = self.problems.get(kind, 0) + n


class Writer:
    def __init__(self, out: Path, seed: int, n_trials: int, truth: Truth):
        self.out = out
        self.resp_dir = out / "response_logs"
        self.resp_dir.mkdir(parents=True, exist_ok=True)
        self.pool = ResponsePool(seed)
        self.n_trials = n_trials
        self.truth = truth

    def trials(self, rng: np.random.Generator, f: Feature, run: str) -> tuple[list[dict], dict]:
        recs: list[dict] = []
        parsed: dict[str, list[dict]] = {}
        n = self.n_trials
        for cond in REAL_CONDITIONS:
            prompt = cond.split("_", 1)[0]
            p_stop, p_inv, shift = _stop_invalid_probs(f, cond)
            u = rng.random(n)
            kinds = np.where(u < p_inv, 2, np.where(rng.random(n) < p_stop, 1, 0))
            amt_p = RISKY_AMOUNT_P * np.exp(shift * 4 * np.log1p(RISKY_AMOUNTS / 20))
            amt_p /= amt_p.sum()
            amounts = rng.choice(RISKY_AMOUNTS, size=n, p=amt_p)
            picks = rng.integers(0, 1 << 30, size=n)
            plist = parsed[cond] = []
            for t in range(n):
                k = kinds[t]
                if k == 1:
                    pool = self.pool.pools[(prompt, "stop", 0)]
                elif k == 2:
                    pool = self.pool.pools[(prompt, "invalid", 0)]
                else:
                    pool = self.pool.pools[(prompt, "bet", int(amounts[t]) if prompt == "risky" else 10)]
                text = pool[picks[t] % len(pool)]
                p = self.pool.parsed(text, run)
                plist.append(p)
                recs.append({"feature": f.name, "condition": cond, "trial": t, "response": text, "parsed": p})
        return recs, parsed

    def write_checkpoint(self, name: str, header: dict, results: list[dict], t: dt.datetime) -> None:
        body = {"timestamp": _ts(t), **header, "features_tested": header.get("features_tested", len(results)),
                "n_trials_per_condition": self.n_trials, "results": results}
        (self.out / name).write_bytes(_dump(body))
        self.truth.checkpoint_files.append(name)
        self.truth.checkpoint_records += len(results)

    def write_log(self, name: str, records: list[dict], t: dt.datetime) -> None:
        (self.resp_dir / name).write_bytes(_dump(records))
        self.truth.response_files.append(name)
        self.truth.file_keys[name] = self.truth.keys_of(records)
        self.truth.file_time[name] = _ts(t)
        self.truth.records += len(records)


def _simulate_process(w: Writer, rng: np.random.Generator, run: str, a: int, b: int, pid: str,
                      feats: list[Feature], start: dt.datetime, per_feature_s: float, save_every: int,
                      crash_after: int | None, aborted: int) -> None:
    stem = f"L{a}_{b}_{pid}"
    header = {"gpu_id": 0, "process_id": pid, "layer_range": f"L{a}-L{b}"}
    t = start
    for _ in range(aborted):  # aborted starts: an initial empty checkpoint, then a crash
        w.write_checkpoint(f"checkpoint_{stem}_{_ts(t)}.json", {**header, "features_tested": 0}, [], t)
        t += dt.timedelta(minutes=float(rng.uniform(20, 90)))
    attempts = [crash_after, None] if crash_after else [None]
    for crash in attempts:
        results: list[dict] = []
        buffer: list[dict] = []
        saves = 0
        for i, f in enumerate(feats):
            t += dt.timedelta(seconds=per_feature_s * float(rng.uniform(0.8, 1.2)))
            recs, parsed = w.trials(rng, f, run)
            results.append(run_a_record(f, parsed) if run == "A" else run_b_record(f, parsed))
            buffer.extend(recs)
            if (i + 1) % save_every == 0:
                w.write_checkpoint(f"checkpoint_{stem}_{_ts(t)}.json", header, list(results), t)
                w.write_log(f"responses_{stem}_{_ts(t)}.json", buffer, t)
                buffer = []
                saves += 1
                if crash is not None and saves >= crash:
                    break
        if crash is not None and saves >= crash:
            t += dt.timedelta(minutes=30)  # restart from scratch (Run A had no resume)
            continue
        if buffer:
            w.write_checkpoint(f"checkpoint_{stem}_{_ts(t)}.json", header, list(results), t)
            w.write_log(f"responses_{stem}_{_ts(t)}.json", buffer, t)
        t += dt.timedelta(seconds=1)
        w.write_checkpoint(f"checkpoint_{stem}_{_ts(t)}.json", {**header, "features_tested": len(feats)},
                           list(results), t)
        w.truth.checkpoint_features.setdefault(run, set()).update(f.name for f in feats)


def model_dimensions(config_path: str | Path) -> tuple[int, int]:
    """(n_layers, d_sae) of the model and SAEs a config names (without loading weights)."""
    from engine.config import load_config
    from engine.model import load_config_only
    from engine.sae import sae_width

    cfg = load_config(config_path)
    n_layers = int(load_config_only(cfg.model).num_hidden_layers)
    _, d_sae = sae_width(cfg.sae, 1 if n_layers > 1 else 0)
    return n_layers, d_sae


def generate(out: str | Path, scale: str = "tiny", seed: int = 0, runs: str = "A,B", defects: bool = False,
             config: str | Path | None = None, n_layers: int | None = None, d_sae: int | None = None) -> dict:
    """Write an experiment directory; returns the EXPERIMENT.json summary."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}")
    sc = SCALES[scale]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = config is None and n_layers is None
    if config is not None:
        n_layers, d_sae = model_dimensions(config)
    n_layers = n_layers or STUDY_LAYERS + 1
    d_sae = d_sae or STUDY_D_SAE
    available = list(range(1, n_layers))  # the study never used layer 0
    layers = available[: sc["layers"]]
    run_list = [r.strip().upper() for r in runs.split(",") if r.strip()]
    truth = Truth()
    w = Writer(out, seed, sc["n_trials"], truth)
    rng = np.random.default_rng(seed)
    for run in run_list:
        feats = _draw_features(rng, run, layers, sc["per_layer"], d_sae, study)
        truth.features[run] = len(feats)
        if run == "A":  # two layers per process, as gpu{G}_L{a}_{b}
            groups = [layers[i:i + 2] for i in range(0, len(layers), 2)]
            procs = [(g[0], g[-1], f"gpu{4 + i // 4}_L{g[0]}_{g[-1]}", g) for i, g in enumerate(groups)]
        else:
            procs = [(l, l, f"L{l}", [l]) for l in layers]
        per_proc = max(1, max(sum(1 for f in feats if f.layer in g) for *_, g in procs))
        per_feature_s = RUN_DAYS[run] * 86400 / (per_proc * (1.3 if run == "A" else 1.0))
        crashing = set(rng.choice(len(procs), size=min(sc["restarts"], len(procs)), replace=False).tolist()) \
            if run == "A" else set()
        for i, (a, b, pid, g) in enumerate(procs):
            pf = [f for f in feats if f.layer in g]
            if not pf:
                continue
            start = RUN_START[run] + dt.timedelta(minutes=7 * i)
            _simulate_process(w, rng, run, a, b, pid, pf, start, per_feature_s, sc["save_every"],
                              crash_after=1 if i in crashing else None,
                              aborted=sc["aborted_starts"] if run == "A" else 0)
    if defects:
        apply_defects(out, truth, rng)
    summary = summarize(out, scale, seed, run_list, defects, layers, d_sae, sc, truth)
    atomic_write_json(out / "EXPERIMENT.json", summary)
    return summary


def _load(path: Path):
    import orjson

    return orjson.loads(path.read_bytes())


def _victims(truth: Truth) -> list[str]:
    """Response logs whose features appear in no other log (so a defect there is not
    hidden by a newer copy), oldest first, spread over the runs."""
    owner: dict[int, set] = {}
    for name, keys in truth.file_keys.items():
        for c in np.unique(keys // 10000).tolist():
            owner.setdefault(c, set()).add(name)
    shared = {n for files in owner.values() if len(files) > 1 for n in files}
    return sorted((n for n in truth.file_keys if n not in shared and len(truth.file_keys[n])),
                  key=lambda n: (truth.file_time[n], n))


def apply_defects(out: Path, truth: Truth, rng: np.random.Generator) -> None:
    """Damage a generated directory in every way the audit must survive; record each defect
    and the problem counts it must produce in `truth`."""
    resp_dir = out / "response_logs"
    victims = _victims(truth)
    if len(victims) < 6:
        raise ValueError("--defects needs at least 6 response logs with unshared features: use --scale small or full")
    step = max(1, len(victims) // 6)
    v = [victims[i * step] for i in range(6)]

    def note(kind: str, file: str, **kw) -> None:
        truth.defects.append({"kind": kind, "file": file, **kw})

    # 1. truncated file: half the records, then a record cut in the middle
    recs = _load(resp_dir / v[0])
    k = len(recs) // 2
    body = _dump(recs[: k + 1])
    cut = len(body) - 2 - len(_dump(recs[k])) // 2
    (resp_dir / v[0]).write_bytes(body[:cut])
    truth.records -= len(recs) - k
    truth.file_keys[v[0]] = truth.file_keys[v[0]][:k]
    truth.add_problem("truncated_file")
    note("truncated_file", v[0], recoverable_records=k)

    # 2. an object where the array belongs (records under one key)
    recs = _load(resp_dir / v[1])
    (resp_dir / v[1]).write_bytes(_dump({"timestamp": truth.file_time[v[1]], "responses": recs}))
    truth.add_problem("object_not_array")
    note("object_not_array", v[1])

    # 3. UTF-8 byte-order mark, and invalid UTF-8 inside one response string
    recs = _load(resp_dir / v[2])
    recs[3] = dict(recs[3], response=recs[3]["response"] + " @@BAD@@")
    body = _dump(recs).replace(b"@@BAD@@", b"\xff\xfeok", 1)
    (resp_dir / v[2]).write_bytes(b"\xef\xbb\xbf" + body)
    truth.add_problem("bom")
    truth.add_problem("invalid_utf8")
    note("bom", v[2])
    note("invalid_utf8", v[2], record=3, field="response")

    # 4. record-level damage in one log
    name = v[3]
    recs = _load(resp_dir / name)
    recs[0] = dict(recs[0], trial=str(recs[0]["trial"]))
    recs[1] = dict(recs[1], response="")
    recs[2] = dict(recs[2], response="   \n")
    recs[4] = dict(recs[4], parsed=dict(recs[4]["parsed"], bet=1400))
    recs[5] = dict(recs[5], parsed=dict(recs[5]["parsed"], bet=-10))
    f0 = recs[0]["feature"]
    lay, fid = f0[1:].split("-")
    good = {k2: v2 for k2, v2 in recs[6].items()}
    bad = [dict(good, feature=f"L{lay}_{fid}"), dict(good, feature=f"{lay}-{fid}")]
    bad += [dict(good, condition="safe_amplification", trial=t) for t in range(3)]
    bad += [{k2: v2 for k2, v2 in good.items() if k2 != "response"}, 42]
    dup = dict(recs[7], response=recs[7]["response"] + " (restart copy)")
    recs = recs + bad + [dup]
    (resp_dir / name).write_bytes(_dump(recs))
    truth.records += len(bad) + 1
    truth.invalid_records += len(bad)
    truth.file_keys[name] = truth.keys_of([r for r in recs if r not in bad])
    for kind, n in (("mistyped_field", 1), ("empty_response", 2), ("absurd_bet", 2), ("malformed_feature", 2),
                    ("unknown_condition", 3), ("missing_field", 1), ("record_not_object", 1)):
        truth.add_problem(kind, n)
    note("record_damage", name, records=[0, 1, 2, 4, 5], appended=len(bad) + 1)

    # 5. missing condition, too few trials, a checkpointed feature without trials, an orphan
    name = v[4]
    recs = _load(resp_dir / name)
    feats = sorted({r["feature"] for r in recs})
    x, y, z = feats[0], feats[1 % len(feats)], feats[2 % len(feats)]
    keep = []
    for r in recs:
        if r["feature"] == x and r["condition"] == "risky_with_safe_patch":
            continue
        if r["feature"] == y and r["condition"] == "safe_baseline" and r["trial"] < 3:
            continue
        if r["feature"] == z:
            continue
        keep.append(r)
    layer = int(x[1:].split("-")[0])
    used = {int(f[1:].split("-")[1]) for f in truth.feature_codes if f.startswith(f"L{layer}-")}
    orphan_id = next(i for i in range(10**6) if i not in used)
    orphan = f"L{layer}-{orphan_id}"
    template = keep[0]
    orphans = [dict(template, feature=orphan, condition=c, trial=t)
               for c in ("safe_baseline", "safe_with_safe_patch") for t in range(2)]
    keep += orphans
    (resp_dir / name).write_bytes(_dump(keep))
    truth.records += len(keep) - len(recs)
    truth.file_keys[name] = truth.keys_of(keep)
    note("feature_damage", name, missing_condition=x, too_few_trials=y, trials_removed=z, orphan=orphan)

    # 6. an empty file and a non-JSON file named .json, beside the last victim
    stem = v[5].rsplit("_", 2)[0]
    t = dt.datetime.strptime(truth.file_time[v[5]], "%Y%m%d_%H%M%S")
    for kind, secs, content in (("empty_file", 5, b""),
                                ("not_json", 9, b"Traceback (most recent call last):\n  File \"run.py\"\nMemoryError\n")):
        fname = f"{stem}_{_ts(t + dt.timedelta(seconds=secs))}.json"
        (resp_dir / fname).write_bytes(content)
        truth.response_files.append(fname)
        truth.file_keys[fname] = np.zeros(0, np.int64)
        truth.file_time[fname] = _ts(t + dt.timedelta(seconds=secs))
        truth.add_problem(kind)
        note(kind, fname)

    # 7. the newest checkpoint of one process: NaN literals, "layer": "12", a layer that
    # disagrees with the name (the audit keeps that record under its name and flags it)
    ck = sorted(n for n in set(truth.checkpoint_files))
    by_stem: dict[str, list[str]] = {}
    for n in ck:
        by_stem.setdefault(n.rsplit("_", 2)[0], []).append(n)
    target = None
    for files in by_stem.values():
        files.sort(key=lambda n: n.rsplit("_", 2)[1] + n.rsplit("_", 2)[2])
        if len(files) >= 2 and len(_load(out / files[-1])["results"]) >= 3 and len(_load(out / files[-2])["results"]) >= 3:
            target = files[-1]
            break
    assert target is not None
    body = _load(out / target)
    res = body["results"]
    res[0] = dict(res[0], cohen_d="@@NAN@@")
    if "safe_p_value" in res[0]:
        res[0]["safe_p_value"] = "@@NAN@@"
    else:
        res[0]["causality"] = dict(res[0]["causality"], safe_p_value="@@NAN@@")
    res[1] = dict(res[1], layer=str(res[1]["layer"]))
    res[2] = dict(res[2], layer=res[2]["layer"] + 1)
    (out / target).write_bytes(_dump(body).replace(b'"@@NAN@@"', b"NaN"))
    for kind, n in (("nan_literal", 1), ("nan_value", 2), ("mistyped_field", 1), ("layer_mismatch", 1)):
        truth.add_problem(kind, n)
    note("checkpoint_damage", target, nan_record=0, mistyped_layer_record=1, layer_mismatch_record=2)


def summarize(out: Path, scale: str, seed: int, runs: list[str], defects: bool, layers: list[int], d_sae: int,
              sc: dict, truth: Truth) -> dict:
    """Expected audit figures computed straight from what was written (no audit code)."""
    order = sorted(truth.file_keys, key=lambda n: (truth.file_time[n], n))
    all_keys = [truth.file_keys[n] for n in order]
    valid = int(sum(len(k) for k in all_keys))
    keys = np.concatenate(all_keys) if all_keys else np.zeros(0, np.int64)
    uniq = np.unique(keys)
    names = {c: f for f, c in truth.feature_codes.items()}
    feat_codes, counts = np.unique(uniq // 10000, return_counts=True)
    log_features = {names[int(c)] for c in feat_codes}
    ckpt_features = set().union(*truth.checkpoint_features.values()) if truth.checkpoint_features else set()
    cond = (uniq // 1000) % 10
    missing_cond = 0
    too_few = 0
    for c in feat_codes:
        sel = (uniq // 10000) == c
        present, per = np.unique(cond[sel], return_counts=True)
        missing_cond += int(len(present) < len(REAL_CONDITIONS))
        too_few += int((per < sc["n_trials"]).sum())
    expected = dict(truth.problems)
    expected.update({
        "missing_conditions": missing_cond,
        "too_few_trials": too_few,
        "feature_without_checkpoint": len(log_features - ckpt_features),
        "checkpoint_without_trials": len(ckpt_features - log_features),
    })
    if len(runs) > 1:
        expected["mixed_runs"] = 1
    return {
        "scale": scale, "seed": seed, "runs": runs, "defects": defects, "layers": layers, "d_sae": d_sae,
        "n_trials_per_condition": sc["n_trials"], "save_every": sc["save_every"],
        "checkpoints_dir": str(out), "responses_dir": str(out / "response_logs"),
        "checkpoint_files": len(set(truth.checkpoint_files)), "response_files": len(set(truth.response_files)),
        "checkpoint_records": truth.checkpoint_records,
        "features_per_run": truth.features,
        "expected": {
            "records_read": truth.records,
            "invalid_records": truth.invalid_records,
            "valid_records": valid,
            "valid_unique_trials": int(len(uniq)),
            "duplicates": int(valid - len(uniq)),
            "response_features": len(log_features),
            "checkpoint_features": len(ckpt_features),
            "joinable_features": len(log_features & ckpt_features),
            "problem_counts": dict(sorted(expected.items())),
        },
        "defect_list": truth.defects,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import time

    p = argparse.ArgumentParser(description="Write a realistic Experiment-2 directory (checkpoints + response logs).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--scale", default="tiny", choices=list(SCALES))
    p.add_argument("--config", default=None, help="draw layers and SAE width from the model this config names")
    p.add_argument("--runs", default="A,B", help="A (Oct, flat records), B (Nov, nested), or A,B (one mixed folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--defects", action="store_true", help="add every kind of damage the audit must survive")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    s = generate(a.out, a.scale, a.seed, a.runs, a.defects, a.config)
    e = s["expected"]
    print(json.dumps({"out": a.out, "checkpoint_files": s["checkpoint_files"], "response_files": s["response_files"],
                      "records": e["records_read"], "valid_unique_trials": e["valid_unique_trials"],
                      "duplicates": e["duplicates"], "seconds": round(time.perf_counter() - t0, 1)}))
    return 0
