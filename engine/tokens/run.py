"""Step 4 driver: group features by layer, share every forward pass, write the views.

Work per run: one SAE load per layer (only the selected features' rows are kept), one
forward pass per prompt (and per prompt + amount context) capturing every needed layer,
batched padded forward passes over the sampled responses, one logit-lens matrix product
per chunk of features, and per layer one batched re-run of the blocks above it for all
patched features and interventions.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import Config
from engine.errors import UserError
from engine.schema import (
    AUDIT_TRIALS,
    CAUSAL_FEATURES,
    PATHWAYS_NODES,
    TOKENS_BEHAVIOURAL_WORDS,
    TOKENS_DECISION_TOKENS,
    TOKENS_INDEX,
    TOKENS_LOGIT_LENS,
    TOKENS_PROMPT_ACTIVATIONS,
    TOKENS_TOP_ACTIVATING,
    FeatureId,
    atomic_write_json,
    atomic_write_parquet,
    read_artifact,
    read_json,
    tokens_node_path,
    tokens_path,
    with_schema,
)

#: Candidates kept per feature for the top examples before identical contexts are merged.
TOP_POOL_FACTOR = 3
MAX_RESPONSE_TOKENS = 160  # responses were generated with max_new_tokens=100; re-tokenising may differ a little
TRIAL_COLUMNS = ["feature", "condition", "prompt", "patch", "trial", "response"]


@dataclass
class Target:
    feature: FeatureId
    record: dict = field(default_factory=dict)
    patch_values: dict[str, float] = field(default_factory=dict)  # "safe"/"risky" -> value


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def load_targets(cfg: Config, only: list[FeatureId] | None = None) -> list[Target]:
    """Selected features from causal_features.json (or `only`, which need not be selected)."""
    path = cfg.cache / CAUSAL_FEATURES
    records: dict[str, dict] = {}
    if path.is_file() or not only:
        sel = read_artifact(path, "causal feature selection", rebuild="python -m engine select --config FILE")
        feats = sel.get("features")
        if not isinstance(feats, list):
            raise UserError(f"causal feature selection {path} has no 'features' list")
        for i, rec in enumerate(feats):
            if not isinstance(rec, dict) or "feature" not in rec:
                raise UserError(f"causal feature selection {path}: record {i} has no 'feature'")
            fid = FeatureId.parse(rec["feature"])
            records[str(fid)] = rec
    wanted = [str(f) for f in only] if only else list(records)
    targets = [Target(FeatureId.parse(name), records.get(name, {})) for name in wanted]
    return sorted(targets, key=lambda t: t.feature)


def validate_targets(cfg: Config, targets: list[Target]) -> int:
    from engine.model import load_config_only
    from engine.sae import sae_width

    mcfg = load_config_only(cfg.model)
    depth = int(mcfg.num_hidden_layers)
    for layer in sorted({t.feature.layer for t in targets}):
        if not 0 <= layer < depth:
            bad = next(t.feature for t in targets if t.feature.layer == layer)
            raise UserError(f"feature {bad}: layer {layer} is outside the model (layers 0..{depth - 1})")
        _, d_sae = sae_width(cfg.sae, layer)
        for t in targets:
            if t.feature.layer == layer and not 0 <= t.feature.feature_id < d_sae:
                raise UserError(f"feature {t.feature}: index {t.feature.feature_id} is outside the SAE (0..{d_sae - 1})")
    return depth


def graph_nodes(cfg: Config, exclude: set[str], depth: int | None = None) -> tuple[list[FeatureId], list[str]]:
    """Every upstream node of the pathway graphs (pathways/nodes.parquet) not in `exclude`, in
    (layer, index) order, and notes on what was left out (a node outside the SAE or the model:
    a pathway computed with other weights)."""
    from engine.sae import sae_width

    path = cfg.cache / PATHWAYS_NODES
    if not path.is_file():
        return [], []
    import pandas as pd

    try:
        ids = pd.read_parquet(path, columns=["id"])["id"].astype(str).unique().tolist()
    except Exception as exc:  # noqa: BLE001  (one unreadable table is a note, not the step's failure)
        return [], [f"graph nodes table {path} cannot be read ({exc}); only the selected features get views"]
    out, bad, widths = [], [], {}
    for name in ids:
        if name in exclude:
            continue
        try:
            fid = FeatureId.parse(name)
            if depth is not None and not 0 <= fid.layer < depth:
                raise UserError(f"layer {fid.layer} is outside the model")
            if fid.layer not in widths:
                widths[fid.layer] = sae_width(cfg.sae, fid.layer)[1]
            if not 0 <= fid.feature_id < widths[fid.layer]:
                raise UserError(f"index {fid.feature_id} is outside the SAE")
        except UserError:
            bad.append(name)
            continue
        out.append(fid)
    notes = [f"{len(bad)} graph node(s) do not fit the model or SAEs and were left out: {', '.join(bad[:5])}"] if bad else []
    return sorted(set(out)), notes


def read_patch_values(path: str | None) -> dict[str, dict[str, float]]:
    """Patch values per feature: the study's Experiment-1 feature file (layer_results ->
    significant_features with feature_idx, safe_mean, bankrupt_mean/risky_mean), or a plain
    {"L12-3456": {"safe": x, "risky": y}} mapping. A bad record is named with the file."""
    if not path:
        return {}
    data = read_json(path, "patch values file")

    def number(v, where: str) -> float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                f = float(v)
            except OverflowError:
                f = math.inf
            if math.isfinite(f):
                return f
        raise UserError(f"patch values file {path}: {where} is {str(v)[:40]!r}, not a finite number")

    def feature(text: str, where: str) -> str:
        try:
            return str(FeatureId.parse(text))
        except UserError as exc:
            raise UserError(f"patch values file {path}: {where}: {exc}") from None

    out: dict[str, dict[str, float]] = {}
    if isinstance(data, dict) and isinstance(data.get("layer_results"), dict):
        for layer, lr in data["layer_results"].items():
            recs = lr.get("significant_features", []) if isinstance(lr, dict) else None
            if not isinstance(recs, list):
                raise UserError(f"patch values file {path}: layer_results.{layer} has no significant_features list")
            for i, rec in enumerate(recs):
                where = f"layer_results.{layer}.significant_features[{i}]"
                idx = rec.get("feature_idx") if isinstance(rec, dict) else None
                if not isinstance(rec, dict) or "safe_mean" not in rec or not (
                        (isinstance(idx, int) and not isinstance(idx, bool))
                        or (isinstance(idx, str) and idx.isascii() and idx.isdigit())):
                    raise UserError(f"patch values file {path}: {where} lacks feature_idx, safe_mean and "
                                    f"bankrupt_mean: {rec!r}"[:300])
                name = feature(f"L{layer}-{idx}", where)
                risky = rec.get("risky_mean", rec.get("bankrupt_mean"))
                out[name] = {"safe": number(rec["safe_mean"], f"{where}.safe_mean"),
                             "risky": number(risky, f"{where}.risky_mean")}
        return out
    if isinstance(data, dict):
        for name, rec in data.items():
            fid = feature(name, repr(name))
            if not isinstance(rec, dict):
                raise UserError(f"patch values file {path}: {name} must map to {{safe: x, risky: y}}")
            out[fid] = {k: number(v, f"{name}.{k}") for k, v in rec.items() if k in ("safe", "risky") and v is not None}
        return out
    raise UserError(f"patch values file {path} must be a JSON object")


def record_patch_values(rec: dict) -> dict[str, float]:
    out = {}
    for side in ("safe", "risky"):
        for key in (f"{side}_patch_value", f"{side}_mean") + (("bankrupt_mean",) if side == "risky" else ()):
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[side] = float(v)
                break
    return out


def load_trials(cfg: Config):
    import pandas as pd

    path = cfg.cache / AUDIT_TRIALS
    if not path.is_file():
        return None
    try:
        import pyarrow.parquet as pq

        names = set(pq.read_schema(path).names)
    except Exception as exc:
        raise UserError(f"trials table {path} cannot be read as Parquet ({exc}); rebuild it with "
                        f"`python -m engine audit --config FILE`") from None
    missing = [c for c in TRIAL_COLUMNS if c not in names]
    if missing:
        raise UserError(f"trials table {path} lacks column(s) {', '.join(missing)}; rebuild it with "
                        f"`python -m engine audit --config FILE`")
    t = pd.read_parquet(path, columns=TRIAL_COLUMNS)
    t["response"] = t["response"].fillna("").astype(str)
    for c in ("feature", "condition", "prompt", "patch"):
        t[c] = t[c].astype(str)
    return t


def choose_sample(trials, cfg: Config):
    """The seeded sample of logged responses (non-empty, with a known prompt)."""
    if trials is None:
        return None
    pool = trials[(trials["response"].str.strip() != "") & trials["prompt"].isin(list(cfg.prompts))]
    n = min(cfg.tokens.sample_size, len(pool))
    return pool.sample(n=n, random_state=cfg.tokens.seed).reset_index(drop=False).rename(columns={"index": "trial_row"})


def single_token_ids(tok, texts: list[str]) -> tuple[list[str], list[int], list[str]]:
    """Keep the texts that are one LLaMA-3 token on their own; report the others."""
    keep, ids, skipped = [], [], []
    for text in texts:
        enc = tok(text, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            keep.append(text)
            ids.append(int(enc[0]))
        else:
            skipped.append(text)
    return keep, ids, skipped


# ---------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------


def run_tokens(cfg: Config, device: str | None = None, only: list[FeatureId] | None = None,
               out_dir: Path | None = None, write_tables: bool = True) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from engine.model import forward_resid_post, load_model, load_tokenizer, resolve_device, tokenize
    from engine.progress import Progress
    from engine.resources import Timings, peak_memory_gb, reset_peak
    from engine.sae import load_sae
    from engine.tokens.text import TokenText
    from engine.tokens.views import FeatureBank, TopActivations, logit_lens, unembedding
    from engine.tokens.words import behavioural_words

    tcfg = cfg.tokens
    timings = Timings()
    targets = load_targets(cfg, only)
    out_dir = Path(out_dir) if out_dir else cfg.cache / "tokens"
    if not targets:
        return _write_outputs(cfg, [], {}, out_dir, write_tables, timings, meta={"note": "no selected features"})
    depth = validate_targets(cfg, targets)
    # The full step also gives every other pathway-graph node its lighter views (logit lens,
    # histogram, distinct top contexts), from the same forward passes; a rerun skips nodes
    # whose file was written from the same inputs.
    nodes: list[FeatureId] = []
    node_notes: list[str] = []
    node_stamp = None
    if only is None and write_tables:
        from engine.manifest import step_fingerprints

        nodes, node_notes = graph_nodes(cfg, {str(t.feature) for t in targets}, depth)
        inputs_now, hash_now = step_fingerprints(cfg, "tokens")
        node_stamp = {"config_hash": hash_now, "inputs": {k: v for k, v in inputs_now.items() if k != "graph_nodes"}}
        todo = [f for f in nodes if not _node_done(cfg, f, node_stamp)]
        node_notes.append(f"{len(nodes)} other graph node(s): {len(nodes) - len(todo)} already written from the same "
                          f"inputs, {len(todo)} computed")
        nodes = todo
    dev = resolve_device(device or cfg.model.device)
    reset_peak(dev)
    extra_values = read_patch_values(tcfg.patch_values_file)
    for t in targets:
        t.patch_values = {**record_patch_values(t.record), **extra_values.get(str(t.feature), {})}

    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.feature.layer, []).append(t)
    node_layer: dict[int, list[FeatureId]] = {}
    for f in nodes:
        node_layer.setdefault(f.layer, []).append(f)
    for l in node_layer:
        by_layer.setdefault(l, [])
    layers = sorted(by_layer)
    names = [str(t.feature) for t in targets]
    # bank rows per layer: the layer's targets first (the interventions index them), then its nodes
    members = {l: [str(t.feature) for t in by_layer[l]] + [str(f) for f in node_layer.get(l, [])] for l in layers}

    with timings.phase("load_tokenizer"):
        tok = load_tokenizer(cfg.model)
        text = TokenText(tok)
    trials = load_trials(cfg)
    notes = []
    if trials is None:
        notes.append(f"no trials table at {cfg.cache / AUDIT_TRIALS}: behavioural words and top activations are "
                     f"empty (run `python -m engine audit --config FILE`)")
        print(f"warning: {notes[-1]}", file=sys.stderr)
    sample = choose_sample(trials, cfg)
    n_batches = 0 if sample is None else math.ceil(len(sample) / max(1, tcfg.batch_size))
    bar = Progress(1 + 2 * len(layers) + n_batches + 2, "tokens", unit="stage")

    # --- behavioural words (CPU) -----------------------------------------
    with timings.phase("behavioural_words"):
        if trials is not None:
            sub = trials[trials["feature"].isin(names)]
            word_rows, word_summary = behavioural_words(sub, tok, text, tcfg.prior_strength, tcfg.min_word_count,
                                                        tcfg.fdr_alpha)
        else:
            word_rows, word_summary = None, {}
    bar.update()

    # --- feature banks: one SAE load per layer -----------------------------
    banks: dict[int, FeatureBank] = {}
    with timings.phase("load_saes"), torch.no_grad():
        for layer in layers:
            sae = load_sae(cfg.sae, layer, device=dev)
            banks[layer] = FeatureBank.from_sae(sae, [FeatureId.parse(n).feature_id for n in members[layer]], dev)
            del sae
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
            bar.update()

    with timings.phase("load_model"):
        model = load_model(cfg.model, dev)

    result: dict[str, dict] = {n: {} for l in layers for n in members[l]}
    with torch.no_grad():
        # --- logit lens ----------------------------------------------------
        with timings.phase("logit_lens"):
            g, W_U = unembedding(model)
            dirs = torch.cat([banks[l].dec for l in layers])
            lens = logit_lens(dirs, g, W_U, tcfg.top_n)
            for row, name in enumerate([n for l in layers for n in members[l]]):
                result[name]["logit_lens"] = {
                    "promoted": _token_list(text, lens["top_ids"][row], lens["top_values"][row]),
                    "suppressed": _token_list(text, lens["bottom_ids"][row], lens["bottom_values"][row]),
                    "vocab_mean": float(lens["mean"][row]),
                    "vocab_std": float(lens["std"][row]),
                }
        bar.update()

        # --- the prompts: activations on every token, residuals for patching --
        choice_texts, choice_ids, skipped_choice = single_token_ids(tok, list(tcfg.choice_tokens))
        amount_texts, amount_ids, skipped_amount = single_token_ids(tok, [str(a) for a in tcfg.bet_amounts])
        cont_ids = tok(tcfg.amount_context, add_special_tokens=False)["input_ids"] if amount_ids else []
        prompt_ids, resid, resid_ext, prompt_acts = {}, {}, {}, {}
        with timings.phase("prompts"):
            for pname, ptext in cfg.prompts.items():
                ids = tokenize(tok, ptext, dev)
                prompt_ids[pname] = ids[0].tolist()
                resid[pname] = forward_resid_post(model, ids, layers)
                prompt_acts[pname] = {l: banks[l].encode(resid[pname][l][0]).cpu() for l in layers}  # (T, F)
                if cont_ids:
                    ext = torch.cat([ids, torch.as_tensor([cont_ids], device=ids.device)], dim=1)
                    resid_ext[pname] = forward_resid_post(model, ext, layers)

        # --- top activations over the sampled responses ----------------------
        tops = {l: TopActivations(len(members[l]), TOP_POOL_FACTOR * tcfg.top_examples, tcfg.context_tokens)
                for l in layers}
        sample_ids: list[list[int]] = []
        sample_prompt_len: list[int] = []
        repeats: dict[int, int] = {}  # first sample index of each distinct token sequence -> its count
        with timings.phase("sample_forward"):
            if sample is not None and len(sample):
                resp_ids = tok(sample["response"].tolist(), add_special_tokens=False)["input_ids"]
                for i, r in enumerate(resp_ids):
                    p_ids = prompt_ids[sample["prompt"].iat[i]]
                    sample_ids.append(p_ids + list(r[:MAX_RESPONSE_TOKENS]))
                    sample_prompt_len.append(len(p_ids))
                first: dict[tuple, int] = {}
                for i, ids_i in enumerate(sample_ids):  # identical responses run once, weighted by their count
                    j = first.setdefault(tuple(ids_i), i)
                    repeats[j] = repeats.get(j, 0) + 1
                order = sorted(repeats, key=lambda i: len(sample_ids[i]))  # little padding
                pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                for s in range(0, len(order), tcfg.batch_size):
                    idx = order[s:s + tcfg.batch_size]
                    lengths = torch.as_tensor([len(sample_ids[i]) for i in idx])
                    T = int(lengths.max())
                    ids = torch.full((len(idx), T), pad, dtype=torch.long)
                    for r, i in enumerate(idx):
                        ids[r, :lengths[r]] = torch.as_tensor(sample_ids[i])
                    pos = torch.arange(T)[None, :]
                    mask = (pos < lengths[:, None]).long()
                    valid = (pos >= torch.as_tensor([sample_prompt_len[i] for i in idx])[:, None]) & mask.bool()
                    res = forward_resid_post(model, ids.to(dev), layers, attention_mask=mask.to(dev))
                    for l in layers:
                        tops[l].add(banks[l].encode(res[l]), valid.to(dev), lengths, torch.as_tensor(idx),
                                    torch.as_tensor([repeats[i] for i in idx], dtype=torch.float32))
                    del res
                    bar.update()

        # --- interventions and decision tokens -------------------------------
        with timings.phase("decision_tokens"):
            for l in layers:
                if not by_layer[l]:  # a layer holding only graph nodes: no interventions
                    bar.update()
                    continue
                _decisions_for_layer(model, l, by_layer[l], banks[l], tops[l], prompt_ids, prompt_acts, resid,
                                     resid_ext, choice_texts, choice_ids, amount_texts, amount_ids, tcfg, result)
                bar.update()
    del model, resid, resid_ext
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()

    # --- assemble per feature ----------------------------------------------------
    sample_meta = {
        "sample_requested": tcfg.sample_size,
        "sample_size": 0 if sample is None else int(len(sample)),
        "seed": tcfg.seed,
        "pool_size": 0 if trials is None else int(((trials["response"].str.strip() != "")
                                                     & trials["prompt"].isin(list(cfg.prompts))).sum()),
    }
    with timings.phase("assemble"):
        words_of = dict(tuple(word_rows.groupby("feature", sort=False))) if word_rows is not None and len(word_rows) else {}
        for l in layers:
            top = tops[l]
            n_selected = len(by_layer[l])
            for j, name in enumerate(members[l]):  # the selected features, then the layer's graph nodes
                rec = result[name]
                rec["prompt_activations"] = {
                    p: _prompt_view(text, prompt_ids[p], prompt_acts[p][l][:, j]) for p in cfg.prompts
                }
                rec["top_activating"] = _top_view(text, top, j, sample, sample_ids, sample_prompt_len,
                                                  tcfg.context_tokens, tcfg.top_examples, repeats)
                rec["activation_histogram"] = top.histogram(j)
                n_tok = top.n_tokens
                rec["activation_stats"] = {
                    **sample_meta,
                    "n_response_tokens": n_tok,
                    "active_tokens": int(top.active_tokens[j]),
                    "density": (int(top.active_tokens[j]) / n_tok) if n_tok else None,
                    "max_activation_sample": float(top.max_activation[j]),
                    "max_activation_prompts": max(v["max"] for v in rec["prompt_activations"].values()),
                }
                if j < n_selected:  # behavioural words are a selected feature's view only
                    rec["behavioural_words"] = _word_view(words_of.get(name), tcfg.top_n)
                    rec["behavioural_summary"] = word_summary.get(name, [])
    bar.update()
    bar.close()
    meta = {
        "model": cfg.model.name_or_path,
        "sae_source": cfg.sae.source,
        "encode_convention": cfg.sae.convention,
        "device": dev,
        "dtype": cfg.model.dtype,
        "choice_tokens": choice_texts,
        "bet_amounts": amount_texts,
        "amount_context": tcfg.amount_context,
        "skipped_tokens": skipped_choice + skipped_amount,
        "amplify_factor": tcfg.amplify_factor,
        "sample": sample_meta,
        "notes": notes + node_notes,
        "graph_nodes": len(nodes),
        "memory_usage_gb": round(peak_memory_gb(dev), 4),
        "memory_kind": "cuda_max_memory_allocated" if dev.startswith("cuda") else "peak_rss",
    }
    tables = {"words": word_rows}
    with timings.phase("write_nodes"):
        for f in nodes:
            _write_node(cfg, f, result[str(f)], meta, node_stamp)
    return _write_outputs(cfg, targets, result, out_dir, write_tables, timings, meta=meta, tables=tables,
                          sample=sample)


def _node_done(cfg: Config, feature: FeatureId, stamp: dict) -> bool:
    """Whether the node's file exists and was written from the same inputs and config."""
    import json

    try:
        doc = json.loads(tokens_node_path(cfg.cache, feature).read_text())
    except (OSError, ValueError):
        return False
    return doc.get("schema_version") == 1 and doc.get("inputs_stamp") == stamp


def _write_node(cfg: Config, feature: FeatureId, rec: dict, meta: dict, stamp: dict) -> None:
    doc = with_schema({
        "feature": str(feature), "layer": feature.layer, "feature_id": feature.feature_id, "kind": "graph_node",
        "inputs_stamp": stamp,
        "metadata": {k: meta[k] for k in ("model", "sae_source", "encode_convention", "device", "dtype", "sample")},
        "logit_lens": {k: rec["logit_lens"][k] for k in ("promoted", "suppressed", "vocab_mean", "vocab_std")},
        "prompt_activations": rec["prompt_activations"],
        "top_activating": rec["top_activating"],
        "activation_histogram": rec["activation_histogram"],
        "activation_stats": rec["activation_stats"],
    })
    atomic_write_json(tokens_node_path(cfg.cache, feature), doc, fsync=False)


def _decisions_for_layer(model, layer, targets, bank, top, prompt_ids, prompt_acts, resid, resid_ext,
                         choice_texts, choice_ids, amount_texts, amount_ids, tcfg, result) -> None:
    import torch

    from engine.tokens.views import patched_log_probs

    # Amplification scale: the feature's largest activation seen (prompts without BOS, and the sample).
    max_act = top.max_activation.clone()
    for p in prompt_ids:
        if len(prompt_ids[p]) > 1:
            max_act = torch.maximum(max_act, prompt_acts[p][layer][1:].max(dim=0).values)
    for pname in prompt_ids:
        pos = len(prompt_ids[pname]) - 1  # the last prompt token, where the study patched
        acts_last = prompt_acts[pname][layer][pos]  # (F,)
        plan = []  # (feature index, intervention name, v, a)
        for j, t in enumerate(targets):
            a = float(acts_last[j])
            m = float(max_act[j])
            plan.append((j, "ablate", 0.0, a))
            if m > 0:
                plan.append((j, "amplify", tcfg.amplify_factor * m, a))
            for side in ("safe", "risky"):
                if side in t.patch_values:
                    plan.append((j, f"{side}_patch", t.patch_values[side], a))
        deltas = torch.zeros(len(plan) + 1, bank.dec.shape[1], device=bank.dec.device)
        for r, (j, _, v, a) in enumerate(plan, start=1):
            deltas[r] = (v - a) * bank.dec[j]
        contexts = [("choice", resid, choice_texts, choice_ids)]
        if amount_ids and resid_ext:
            contexts.append(("amount", resid_ext, amount_texts, amount_ids))
        for context, res, texts, ids in contexts:
            if not ids:
                continue
            lp = patched_log_probs(model, res[pname][layer], layer, pos, deltas, torch.as_tensor(ids),
                                   tcfg.batch_size).double()  # (R+1, K)
            base = lp[0]
            for r, (j, inter, v, a) in enumerate(plan, start=1):
                rec = result[str(targets[j].feature)]
                dec = rec.setdefault("logit_lens", {}).setdefault("decision_tokens", [])
                summ = rec["logit_lens"].setdefault("decision_summary", [])
                for k, (tt, tid) in enumerate(zip(texts, ids)):
                    dec.append({
                        "prompt": pname, "context": context, "intervention": inter, "value": v, "activation": a,
                        "token": tt, "token_id": tid,
                        "logp_base": float(base[k]), "logp_patched": float(lp[r, k]),
                        "delta_logp": float(lp[r, k] - base[k]),
                        "p_base": float(base[k].exp()), "p_patched": float(lp[r, k].exp()),
                        "delta_p": float(lp[r, k].exp() - base[k].exp()),
                    })
                s = {"prompt": pname, "context": context, "intervention": inter, "value": v, "activation": a}
                if context == "choice" and "1" in texts and "2" in texts:
                    i1, i2 = texts.index("1"), texts.index("2")
                    s["bet_vs_stop_logodds_base"] = float(base[i1] - base[i2])
                    s["bet_vs_stop_logodds_patched"] = float(lp[r, i1] - lp[r, i2])
                    s["delta_bet_vs_stop_logodds"] = s["bet_vs_stop_logodds_patched"] - s["bet_vs_stop_logodds_base"]
                if context == "amount":
                    amounts = torch.as_tensor([float(x) for x in texts], dtype=torch.float64)
                    pb, pp = base.exp(), lp[r].exp()
                    s["mean_amount_base"] = float((amounts * pb).sum() / pb.sum())
                    s["mean_amount_patched"] = float((amounts * pp).sum() / pp.sum())
                    s["delta_mean_amount"] = s["mean_amount_patched"] - s["mean_amount_base"]
                    s["p_amounts_base"] = float(pb.sum())
                    s["p_amounts_patched"] = float(pp.sum())
                summ.append(s)
    for t in targets:
        ll = result[str(t.feature)].setdefault("logit_lens", {})
        ll.setdefault("decision_tokens", []).sort(key=lambda d: -abs(d["delta_logp"]))
        ll.setdefault("decision_summary", [])


def _token_list(text, ids, values) -> list[dict]:
    out = []
    for i, v in zip(ids.tolist(), values.tolist()):
        raw, shown = text(i)
        out.append({"token_id": int(i), "token": shown, "text": raw, "value": float(v)})
    return out


def _prompt_view(text, ids: list[int], acts) -> dict:
    vals = [float(x) for x in acts.tolist()]
    body = vals[1:] if len(vals) > 1 else vals  # BOS is out of distribution: excluded from the statistics
    m = max(body) if body else 0.0
    arg = (vals.index(m, 1) if len(vals) > 1 else 0) if body else None
    return {
        "tokens": [text.shown(i) for i in ids],
        "token_ids": list(ids),
        "activations": vals,
        "max": m,
        "argmax_position": arg,
        "last_token_activation": vals[-1] if vals else None,
        "n_active": int(sum(1 for v in body if v > 0)),
        "bos_excluded_from_stats": len(vals) > 1,
    }


def _top_view(text, top, j, sample, sample_ids, sample_prompt_len, c, k: int | None = None,
              repeats: dict[int, int] | None = None) -> list[dict]:
    """The k strongest examples with distinct contexts: identical responses were run once; of
    candidates whose context window (the tokens shown) is the same, only the strongest stays."""
    import math as _m

    out = []
    if sample is None or top.values.shape[1] == 0:
        return out
    seen: set[tuple] = set()
    for rank in range(top.values.shape[1]):
        if k is not None and len(out) >= k:
            break
        v = float(top.values[j, rank])
        if not _m.isfinite(v) or v <= 0:  # a response where the feature never fires is no example of it
            continue
        s = int(top.samples[j, rank])
        p = int(top.positions[j, rank])
        ids = sample_ids[s]
        lo, hi = max(0, p - c), min(len(ids), p + c + 1)
        key = (tuple(ids[lo:hi]), p - lo)
        if key in seen:
            continue
        seen.add(key)
        win = top.windows[j, rank].tolist()
        row = sample.iloc[s]
        out.append({
            "rank": len(out) + 1,
            "activation": v,
            "sample": s,
            "source_feature": str(row["feature"]),
            "condition": str(row["condition"]),
            "trial": int(row["trial"]) if str(row["trial"]).lstrip("-").isdigit() else str(row["trial"]),
            "prompt": str(row["prompt"]),
            "position": p,
            "response_position": p - sample_prompt_len[s],
            "token_id": int(ids[p]),
            "token": text.shown(ids[p]),
            "context_tokens": [text.shown(i) for i in ids[lo:hi]],
            "context_activations": [None if _m.isnan(x) else float(x) for x in win[lo - (p - c):hi - (p - c)]],
            "center": p - lo,
            "repeats": (repeats or {}).get(s, 1),
        })
    return out


def _word_view(fw, top_n: int) -> list[dict]:
    """Top `top_n` terms by |z| per (comparison, tokenisation), then all of them strongest first."""
    if fw is None or not len(fw):
        return []
    fw = fw.assign(abs_z=fw["z"].abs())
    parts = [g.nlargest(top_n, "abs_z") for _, g in fw.groupby(["prompt", "patch", "tokenization"], sort=True)]
    import pandas as pd

    top = pd.concat(parts).sort_values("abs_z", ascending=False, kind="mergesort").drop(columns="abs_z")
    recs = top.to_dict(orient="records")
    for r in recs:
        r["token_id"] = None if pd.isna(r["token_id"]) else int(r["token_id"])
        r["significant"] = bool(r["significant"])
        for k in ("count_patched", "count_baseline", "total_patched", "total_baseline", "responses_patched",
                  "responses_baseline", "n_responses_patched", "n_responses_baseline"):
            r[k] = int(r[k])
    return recs


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _write_outputs(cfg: Config, targets, result, out_dir: Path, write_tables: bool, timings, meta: dict,
                   tables: dict | None = None, sample=None) -> dict:
    import pandas as pd

    from engine.manifest import step_fingerprints

    inputs, config_hash = step_fingerprints(cfg, "tokens")
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    meta = {**meta, "config_hash": config_hash, "created": created, "timings_s": timings.as_dict()}
    written = []
    for t in targets:
        name = str(t.feature)
        rec = result[name]
        doc = with_schema({
            "feature": name,
            "layer": t.feature.layer,
            "feature_id": t.feature.feature_id,
            "direction": t.record.get("direction"),
            "patch_values": t.patch_values,
            "metadata": meta,
            "logit_lens": rec["logit_lens"],
            "prompt_activations": rec["prompt_activations"],
            "top_activating": rec["top_activating"],
            "activation_stats": rec["activation_stats"],
            "activation_histogram": rec.get("activation_histogram"),
            "behavioural_words": rec["behavioural_words"],
            "behavioural_summary": rec["behavioural_summary"],
        })
        p = out_dir / f"{name}.json" if out_dir != cfg.cache / "tokens" else tokens_path(cfg.cache, t.feature)
        atomic_write_json(p, doc)
        written.append(p)
    summary = {"n_features": len(targets), "out_dir": str(out_dir), "files": [str(p) for p in written]}
    if not write_tables:
        return summary
    rows = {"lens": [], "decision": [], "prompt": [], "top": []}
    for t in targets:
        name = str(t.feature)
        rec = result[name]
        base = {"feature": name, "layer": t.feature.layer, "feature_id": t.feature.feature_id}
        for kind in ("promoted", "suppressed"):
            for rank, e in enumerate(rec["logit_lens"][kind], start=1):
                rows["lens"].append({**base, "kind": kind, "rank": rank, **e})
        for e in rec["logit_lens"].get("decision_tokens", []):
            rows["decision"].append({**base, **e})
        for pname, pv in rec["prompt_activations"].items():
            for pos, (tid, tk, a) in enumerate(zip(pv["token_ids"], pv["tokens"], pv["activations"])):
                rows["prompt"].append({**base, "prompt": pname, "position": pos, "token_id": tid, "token": tk,
                                       "activation": a})
        for e in rec["top_activating"]:
            rows["top"].append({**base, **e})
    out_tables = {
        TOKENS_LOGIT_LENS: pd.DataFrame(rows["lens"], columns=["feature", "layer", "feature_id", "kind", "rank",
                                                                "token_id", "token", "text", "value"]),
        TOKENS_DECISION_TOKENS: pd.DataFrame(rows["decision"], columns=[
            "feature", "layer", "feature_id", "prompt", "context", "intervention", "value", "activation", "token",
            "token_id", "logp_base", "logp_patched", "delta_logp", "p_base", "p_patched", "delta_p"]),
        TOKENS_PROMPT_ACTIVATIONS: pd.DataFrame(rows["prompt"], columns=[
            "feature", "layer", "feature_id", "prompt", "position", "token_id", "token", "activation"]),
        TOKENS_TOP_ACTIVATING: pd.DataFrame(rows["top"], columns=[
            "feature", "layer", "feature_id", "rank", "activation", "sample", "source_feature", "condition", "trial",
            "prompt", "position", "response_position", "token_id", "token", "context_tokens",
            "context_activations", "center"]),
    }
    words = (tables or {}).get("words")
    if words is None:
        from engine.tokens.words import behavioural_words  # noqa: F401  (columns documented there)

        words = pd.DataFrame(columns=["feature", "prompt", "patch", "patched_condition", "baseline_condition",
                                      "tokenization", "term", "token_id", "count_patched", "count_baseline",
                                      "total_patched", "total_baseline", "responses_patched", "responses_baseline",
                                      "n_responses_patched", "n_responses_baseline", "log_odds", "z", "p", "q",
                                      "significant"])
    out_tables[TOKENS_BEHAVIOURAL_WORDS] = words
    for rel, frame in out_tables.items():
        if "trial" in frame.columns:
            frame["trial"] = frame["trial"].astype(str)
        atomic_write_parquet(cfg.cache / rel, frame)
        written.append(cfg.cache / rel)
    index = with_schema({
        "created": created,
        "config_hash": config_hash,
        "inputs": inputs,
        "features": [str(t.feature) for t in targets],
        "metadata": meta,
        "sample": None if sample is None else sample[["trial_row", "feature", "condition", "prompt", "trial"]]
        .astype({"trial": str}).to_dict(orient="records"),
        "tables": {rel: int(len(f)) for rel, f in out_tables.items()},
    })
    atomic_write_json(cfg.cache / TOKENS_INDEX, index)
    written.append(cfg.cache / TOKENS_INDEX)
    summary["files"] = [str(p) for p in written]
    summary["tables"] = index["tables"]
    summary["inputs"] = inputs
    summary["config_hash"] = config_hash
    return summary
