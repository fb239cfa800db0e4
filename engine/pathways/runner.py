"""Running the pathway step: targets in chunks, shared work per prompt, atomic results.

Per run: load the model once; per prompt, one no-grad forward pass and one SAE load per
layer give the sparse codes every target reuses (then the SAE is freed). Per chunk of
targets (sorted by layer): per prompt, one forward pass with autograd, batched
backward passes for the targets (node attribution), batched forward-mode passes for the
graphs' edge sources (exact edges; each source once per prompt however many graphs hold
it, contracted with every target's gradient weights), and batched replays grouped by upstream layer (each intervention once, read by
every target that asked for it). Each target's JSON is written atomically when its
chunk is done; a restart skips targets whose file matches the current config hash.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import Config
from engine.errors import UserError
from engine.model import run_blocks
from engine.pathways import graph as G
from engine.pathways.index import write_export
from engine.pathways.compute import (GradGraph, Intervention, LayerCodes, PromptCodes, TargetSpec, contract,
                                     encode_layer, feature_totals, layer_terms, replay, source_contribution)
from engine.schema import PATHWAY_SCHEMA_VERSION, FeatureId, atomic_write_json, pathway_path, with_schema


@dataclass
class NodeRec:
    """A selected upstream node of one target on one prompt."""

    layer: int
    uidx: int  # index into LayerCodes.features
    feature_id: int
    attribution: float
    positions: list[int]
    position_activations: list[float]
    position_attributions: list[float]

    @property
    def id(self) -> str:
        return f"L{self.layer}-{self.feature_id}"

    @property
    def activation(self) -> float:
        return float(sum(self.position_activations))


def method_hash(cfg: Config) -> str:
    """Hash of everything that changes a pathway result (not batch sizes or limits)."""
    import hashlib
    import json

    p = cfg.to_dict()["pathways"]
    for k in ("target_batch_size", "replay_batch_size", "limit", "chunk_size"):
        p.pop(k, None)
    blob = {"model": cfg.to_dict()["model"], "sae": cfg.to_dict()["sae"], "prompts": cfg.prompts, "pathways": p}
    for k in ("device", "local_files_only"):
        blob["model"].pop(k, None)
        blob["sae"].pop(k, None)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def target_specs(saes_by_layer: dict, targets: list[FeatureId], compute_dtype) -> dict[str, TargetSpec]:
    out = {}
    for t in targets:
        sae = saes_by_layer[t.layer]
        e, b = sae.encoder_rows(torch.tensor([t.feature_id], device=sae.device))
        out[str(t)] = TargetSpec(str(t), t.layer, t.feature_id, e[0].to(compute_dtype), float(b[0]), float(sae.threshold))
    return out


class PathwayEngine:
    def __init__(self, cfg: Config, model, tokenizer, device: str, log=None):
        self.cfg = cfg
        self.pc = cfg.pathways
        self.model = model
        self.tok = tokenizer
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.log = log or (lambda s: None)
        self.prompts: dict[str, PromptCodes] = {}
        self.specs: dict[str, TargetSpec] = {}
        self.timings: dict[str, float] = {}
        #: layer -> SAE; defaults to reading the configured files (benchmarks inject random SAEs)
        self.sae_loader = None

    # -- shared per-prompt work ------------------------------------------------
    def encode_prompts(self, prompt_names: list[str], targets: list[FeatureId], on_layer=None) -> None:
        """Sparse codes of every needed layer on every prompt, and the targets' encoder rows."""
        from engine.model import forward_resid_post, tokenize, token_strings
        from engine.sae import load_sae

        t0 = time.perf_counter()
        max_layer = max(t.layer for t in targets)
        first = max(0, min(self.pc.first_layer, max_layer))
        layers = list(range(first, max_layer + 1))
        target_layers = {t.layer for t in targets}
        resid = {}
        for name in prompt_names:
            text = self.cfg.prompts[name]
            ids = tokenize(self.tok, text, self.device)
            self.prompts[name] = PromptCodes(name, text, ids, token_strings(self.tok, ids[0]))
            with torch.no_grad():
                resid[name] = forward_resid_post(self.model, ids, layers)
        exclude = [0] if self.pc.exclude_bos else []
        for layer in layers:
            sae = self.sae_loader(layer) if self.sae_loader else load_sae(self.cfg.sae, layer, device=self.device)
            for name in prompt_names:
                h = resid[name][layer][0]
                codes = encode_layer(sae, h, exclude, self.dtype)
                pc = self.prompts[name]
                if layer < max_layer:
                    pc.layers[layer] = codes
                q = pc.T - 1
                last = codes.pos == q
                pc.last_token[layer] = {int(codes.features[codes.inv[k]]): float(codes.act[k])
                                        for k in torch.nonzero(last).flatten().tolist()}
            if layer in target_layers:
                self.specs.update(target_specs({layer: sae}, [t for t in targets if t.layer == layer], self.dtype))
            del sae
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            if on_layer:
                on_layer(layer)
        self.timings["encode_s"] = time.perf_counter() - t0

    # -- one chunk of targets -----------------------------------------------------
    def run_chunk(self, targets: list[FeatureId]) -> dict[str, dict]:
        t0 = time.perf_counter()
        specs = [self.specs[str(t)] for t in targets]
        results = {s.name: {"prompts": {}} for s in specs}
        for pname, pc in self.prompts.items():
            recs = self._prompt(pc, specs)
            for s in specs:
                results[s.name]["prompts"][pname] = recs[s.name]
        dt = time.perf_counter() - t0
        for s in specs:
            results[s.name]["chunk_seconds"] = dt
            results[s.name]["chunk_targets"] = len(specs)
        return results

    def _prompt(self, pc: PromptCodes, specs: list[TargetSpec]) -> dict[str, dict]:
        T, q = pc.T, pc.T - 1
        max_L = max(s.layer for s in specs)
        up_layers = [l for l in sorted(pc.layers) if l < max_L]
        gg = GradGraph(self.model, pc.ids, up_layers + sorted({s.layer for s in specs}))
        pre = {s.name: float(gg.h[s.layer][0, q].detach().double() @ s.enc.double()) + s.bias for s in specs}

        # 1. node attribution: one batched VJP per batch of targets
        nodes: dict[str, list[NodeRec]] = {s.name: [] for s in specs}
        terms: dict[str, dict] = {s.name: {} for s in specs}
        totals: dict[str, dict] = {s.name: {"abs": 0.0, "signed": 0.0} for s in specs}
        exact = self.pc.edge_weight == "exact"
        #: per target and layer, its per-entry attributions (they give the exact edges' seeds)
        entry_attr: dict[str, dict[int, torch.Tensor]] = {s.name: {} for s in specs}
        B = max(1, self.pc.target_batch_size)
        for b0 in range(0, len(specs), B):
            batch = specs[b0:b0 + B]
            inputs = [l for l in up_layers if l < max(s.layer for s in batch)]
            if not inputs:
                continue
            seeds: dict[int, torch.Tensor] = {}
            for j, s in enumerate(batch):
                if s.layer not in seeds:
                    seeds[s.layer] = torch.zeros((len(batch), T, s.enc.shape[0]), dtype=self.dtype, device=s.enc.device)
                seeds[s.layer][j, q] = s.enc
            grads = self._vjp(gg, seeds, inputs)
            for l in inputs:
                codes = pc.layers[l]
                A = contract(grads[l], codes)  # (B, K)
                lt = layer_terms(grads[l], codes, gg.h[l][0].detach(), A, self.pc.exclude_bos)
                for j, s in enumerate(batch):
                    if l >= s.layer:
                        continue
                    terms[s.name][str(l)] = {k: float(v[j]) for k, v in lt.items()}
                    picked = self._select(codes, A[j], totals[s.name])
                    nodes[s.name].extend(picked)
                    if exact and picked:
                        entry_attr[s.name][l] = A[j].clone()
                del grads[l]
        for s in specs:
            nodes[s.name] = self._limit_layers(nodes[s.name])
            keep = sorted({x.layer for x in nodes[s.name]})[1:]  # receiving graph layers
            entry_attr[s.name] = {l: entry_attr[s.name][l] for l in keep if l in entry_attr[s.name]}

        # 2. edges: exact, one VJP row per (target, node above the lowest graph layer) plus one
        # per (target, receiving layer) for the whole layer; or the old approximation
        raw = self._edges_exact(gg, pc, specs, nodes, entry_attr) if exact else self._edges_raw(gg, pc, nodes)
        del entry_attr

        # 3. replay validation
        replays = self._replays(gg, pc, specs, nodes)

        out = {}
        for s in specs:
            out[s.name] = self._record(pc, s, pre[s.name], nodes[s.name], raw, replays.get(s.name, {}),
                                       terms[s.name], totals[s.name])
        del gg
        return out

    def _vjp(self, gg: GradGraph, seeds, inputs):
        try:
            return gg.vjp(seeds, inputs)
        except torch.cuda.OutOfMemoryError:
            # shrink: split the batch rows in two and retry each half
            torch.cuda.empty_cache()
            n = next(iter(seeds.values())).shape[0]
            if n == 1:
                raise
            h = n // 2
            a = self._vjp(gg, {L: s[:h] for L, s in seeds.items()}, inputs)
            b = self._vjp(gg, {L: s[h:] for L, s in seeds.items()}, inputs)
            return {l: torch.cat([a[l], b[l]]) for l in inputs}

    def _select(self, codes: LayerCodes, A: torch.Tensor, totals: dict) -> list[NodeRec]:
        U = codes.features.shape[0]
        feat_tot = torch.zeros(U, dtype=A.dtype, device=A.device).index_add_(0, codes.inv, A)
        totals["abs"] += float(feat_tot.abs().sum())
        totals["signed"] += float(feat_tot.sum())
        scores = feat_tot.cpu().tolist()
        kept = G.select_indices(scores, self.pc.top_k_per_layer, self.pc.coverage)
        out = []
        for u in kept:
            ent = codes.entries_of(u)  # entries are in position order (nonzero is row-major)
            out.append(NodeRec(
                layer=codes.layer, uidx=u, feature_id=int(codes.features[u]), attribution=scores[u],
                positions=codes.pos[ent].tolist(),
                position_activations=codes.act[ent].tolist(),
                position_attributions=A[ent].tolist(),
            ))
        return out

    def _limit_layers(self, nodes: list[NodeRec]) -> list[NodeRec]:
        n = self.pc.max_graph_layers
        if not n:
            return nodes
        weight: dict[int, float] = {}
        for x in nodes:
            weight[x.layer] = weight.get(x.layer, 0.0) + abs(x.attribution)
        keep = set(sorted(weight, key=lambda l: -weight[l])[:n])
        return [x for x in nodes if x.layer in keep]

    def _edges_raw(self, gg: GradGraph, pc: PromptCodes, nodes: dict[str, list[NodeRec]]) -> dict:
        """raw[(l_v, u_v)][(l_u, u_u)] for every v above the lowest layer of some graph."""
        needed: dict[tuple[int, int], set[int]] = {}  # v -> lower layers it needs
        union: dict[int, set[int]] = {}  # layer -> node uidx in any graph
        for ns in nodes.values():
            layers = sorted({x.layer for x in ns})
            for x in ns:
                union.setdefault(x.layer, set()).add(x.uidx)
            for k in range(1, len(layers)):
                for x in ns:
                    if x.layer == layers[k]:
                        needed.setdefault((x.layer, x.uidx), set()).add(layers[k - 1])
        raw: dict[tuple[int, int], dict[tuple[int, int], float]] = {}
        vs = sorted(needed)
        B = max(1, self.pc.target_batch_size)
        T = pc.T
        for b0 in range(0, len(vs), B):
            batch = vs[b0:b0 + B]
            inputs = sorted({l for v in batch for l in needed[v]})
            seeds: dict[int, torch.Tensor] = {}
            for j, (lv, uv) in enumerate(batch):
                codes = pc.layers[lv]
                if lv not in seeds:
                    seeds[lv] = torch.zeros((len(batch), T, codes.enc.shape[1]), dtype=self.dtype,
                                            device=codes.enc.device)
                # d(sum over v's active positions of pre_v)/dh_{l_v}[p] = e_v at each such p
                for k in codes.entries_of(uv).tolist():
                    seeds[lv][j, codes.pos[k]] += codes.enc[uv]
            grads = self._vjp(gg, seeds, inputs)
            for l in inputs:
                codes_u = pc.layers[l]
                A = contract(grads[l], codes_u)  # (B, K)
                members = sorted(union.get(l, ()))
                if not members:
                    continue
                U = codes_u.features.shape[0]
                for j, v in enumerate(batch):
                    if l not in needed[v]:
                        continue
                    tot = torch.zeros(U, dtype=A.dtype, device=A.device).index_add_(0, codes_u.inv, A[j])
                    vals = tot[members].tolist()
                    raw.setdefault(v, {}).update({(l, u): float(val) for u, val in zip(members, vals)})
                del grads[l]
        return raw

    def _edges_exact(self, gg: GradGraph, pc: PromptCodes, specs: list[TargetSpec],
                     nodes: dict[str, list[NodeRec]], entry_attr: dict[str, dict[int, torch.Tensor]]) -> dict:
        """Exact first-order path weights for every target of the chunk.

        w_t(src -> v) = sum_{p in P_v} g_v[p] e_v . dh_{l_v}[p]/d(src), with
        g_v[p] = <d_v, dpre_t/dh_{l_v}[p]> read from the target's own gradient (its per-entry
        attributions over the activation). The tangent dh_{l_v}/d(src) does not depend on the
        target, so it is computed once per source (graph features of the lower layer, that
        layer's SAE error and decoder bias) by one batched forward-mode pass (JVP) over blocks
        l_u+1..l_v, then contracted with every target's weights: one pass per source instead of
        one backward pass per (target, node). The same tangents give what reaches the target
        through *all* active features of l_v; the rest of a source's attribution passes
        through l_v's SAE error.
        Returns {t: {(l_v, uidx_v | None): {"features": {uidx_u: w}, "error": w, "bias": w}}}."""
        pairs: dict[int, dict[int, list[str]]] = {}  # l_u -> l_v -> targets with that pair
        members: dict[str, dict[int, list[int]]] = {s.name: {} for s in specs}
        for s in specs:
            for x in nodes[s.name]:
                members[s.name].setdefault(x.layer, []).append(x.uidx)
            layers = sorted(members[s.name])
            for k in range(1, len(layers)):
                pairs.setdefault(layers[k - 1], {}).setdefault(layers[k], []).append(s.name)
        out: dict[str, dict] = {s.name: {} for s in specs}
        B = max(1, self.pc.target_batch_size)
        T = pc.T
        bos = self.pc.exclude_bos
        for lu, by_lv in sorted(pairs.items()):
            codes_u = pc.layers[lu]
            users = sorted({t for ts in by_lv.values() for t in ts})
            feats = sorted({u for t in users for u in members[t][lu]})
            sources: list[int | str] = [*feats, "error", "bias"]
            lvs = sorted(by_lv)
            for b0 in range(0, len(sources), B):
                batch = sources[b0:b0 + B]
                tan = torch.stack([source_contribution(codes_u, src, T, bos) for src in batch]).to(self.dtype)
                dh = self._jvp(gg.h[lu].detach()[0], tan, lu, lvs)
                row_of = {src: j for j, src in enumerate(batch)}
                for lv in lvs:
                    codes_v = pc.layers[lv]
                    E = contract(dh[lv], codes_v, encoder=True)  # (b, K): e_k . dh[p_k]
                    del dh[lv]
                    for t in by_lv[lv]:
                        coef = entry_attr[t][lv] / codes_v.act  # g_k per unit activation, (K,)
                        through = E @ coef  # (b,): via all active features of l_v
                        F = feature_totals(E * coef, codes_v)  # (b, U): via each feature of l_v
                        rows = [(src, row_of[src]) for src in (*members[t][lu], "error", "bias") if src in row_of]
                        if not rows:
                            continue
                        idx = [j for _, j in rows]
                        vs = members[t][lv]
                        vals = F[idx][:, vs].tolist()
                        allv = through[idx].tolist()
                        for (src, _), rv, av in zip(rows, vals, allv):
                            for key, w in [*zip(vs, rv), (None, av)]:
                                rec = out[t].setdefault((lv, key), {"features": {}, "error": 0.0, "bias": 0.0})
                                if isinstance(src, str):
                                    rec[src] = w
                                else:
                                    rec["features"][src] = w
        return out

    def _jvp(self, h: torch.Tensor, tangents: torch.Tensor, lu: int, lvs: list[int]) -> dict[int, torch.Tensor]:
        """Forward-mode derivative of h_{l_v} (each l_v in lvs) along each row of `tangents`
        (b, T, d) added to h_{l_u}: {l_v: (b, T, d)}. CUDA OOM halves the batch."""
        import torch.autograd.forward_ad as fwAD

        try:
            with torch.no_grad(), fwAD.dual_level():
                x = fwAD.make_dual(h.expand(tangents.shape[0], -1, -1).contiguous(), tangents)
                res = run_blocks(self.model, x, lu + 1, max(lvs), keep=lvs)
                return {l: fwAD.unpack_dual(res[l]).tangent for l in lvs}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            n = tangents.shape[0]
            if n == 1:
                raise
            a = self._jvp(h, tangents[:n // 2], lu, lvs)
            b = self._jvp(h, tangents[n // 2:], lu, lvs)
            return {l: torch.cat([a[l], b[l]]) for l in lvs}

    def _replays(self, gg: GradGraph, pc: PromptCodes, specs: list[TargetSpec], nodes) -> dict:
        """{target: {(layer, uidx): {"zero": Δpre, "zero_act": Δact, "patch": Δpre}}}."""
        n = self.pc.n_replay
        if n <= 0:
            return {}
        modes = ["zero", "patch"] if self.pc.replay_mode == "both" else [self.pc.replay_mode]
        other = [p for p in self.prompts if p != pc.name]
        if "patch" in modes and len(other) != 1:
            modes = [m for m in modes if m != "patch"]  # patching needs exactly one other prompt
        wanted: dict[tuple[int, int], set[str]] = {}
        for s in specs:
            top = sorted(nodes[s.name], key=lambda x: -abs(x.attribution))[:n]
            for x in top:
                wanted.setdefault((x.layer, x.uidx), set()).add(s.name)
        out: dict[str, dict] = {}
        by_layer: dict[int, list[int]] = {}
        for (l, u) in wanted:
            by_layer.setdefault(l, []).append(u)
        spec_by_name = {s.name: s for s in specs}
        for l, us in sorted(by_layer.items()):
            us = sorted(us)
            codes = pc.layers[l]
            tgts = sorted({t for u in us for t in wanted[(l, u)]})
            tspecs = [spec_by_name[t] for t in tgts]
            for mode in modes:
                ivs = []
                for u in us:
                    if mode == "zero":
                        ivs.append(Intervention(l, u, "zero"))
                    else:
                        fid = int(codes.features[u])
                        ivs.append(Intervention(l, u, "patch", patch_value=self.prompts[other[0]].last_token.get(l, {}).get(fid, 0.0)))
                clean, deltas = replay(self.model, gg.h[l].detach()[0:1], codes, ivs, tspecs, pc.T, self.pc.replay_batch_size)
                for i, u in enumerate(us):
                    for k, t in enumerate(tgts):
                        if t not in wanted[(l, u)]:
                            continue
                        rec = out.setdefault(t, {}).setdefault((l, u), {})
                        d = float(deltas[i, k])
                        rec[mode] = d
                        if mode == "zero":
                            th = tspecs[k].threshold
                            c = float(clean[k])
                            gate = lambda x: x if x > th else 0.0  # noqa: E731
                            rec["zero_act"] = gate(c + d) - gate(c)
        return out

    def _record(self, pc: PromptCodes, s: TargetSpec, pre: float, ns: list[NodeRec], raw: dict, rep: dict,
                terms: dict, totals: dict) -> dict:
        act = pre if pre > s.threshold else 0.0
        exact = self.pc.edge_weight == "exact"
        node_dicts = []
        for x in sorted(ns, key=lambda x: (x.layer, -abs(x.attribution))):
            r = rep.get((x.layer, x.uidx), {})
            d, d_act = r.get("zero"), r.get("zero_act")
            node_dicts.append({
                "id": x.id, "kind": "feature", "layer": x.layer, "feature_id": x.feature_id, "is_target": False,
                "positions": x.positions, "position_activations": x.position_activations,
                "position_attributions": x.position_attributions,
                "activation": x.activation, "attribution": x.attribution,
                "replay_delta": d, "replay_delta_activation": d_act,
                "patch_delta": r.get("patch"),
                **G.validation(x.attribution, d, d_act, pre, self.pc.validate_min_abs_delta,
                               self.pc.validate_min_rel_delta),
            })
        layers = sorted({x.layer for x in ns})
        if exact:  # one SAE-error and one decoder-bias node per graph layer
            for l in layers:
                for kind in ("error", "bias"):
                    node_dicts.append({
                        "id": G.source_node_id(l, kind), "kind": kind, "layer": l, "feature_id": None,
                        "is_target": False, "positions": [], "position_activations": [], "position_attributions": [],
                        "activation": None, "attribution": terms[str(l)][kind],
                        "replay_delta": None, "replay_delta_activation": None, "patch_delta": None,
                        **G.validation(None, None, None, pre, 0.0, 0.0),
                    })
        node_dicts.append({
            "id": s.name, "kind": "feature", "layer": s.layer, "feature_id": s.feature_id, "is_target": True,
            "positions": [pc.T - 1], "position_activations": [act], "position_attributions": [None],
            "activation": act, "attribution": None, "replay_delta": None, "replay_delta_activation": None,
            "patch_delta": None, **G.validation(None, None, None, pre, 0.0, 0.0),
        })
        edges = self._edges_exact_record(s, ns, raw.get(s.name, {}), terms, layers, node_dicts) if exact else \
            self._edges_approx_record(s, ns, raw, layers)
        rec = {
            "text": pc.text,
            "n_tokens": pc.T,
            "tokens": pc.tokens,
            "target_position": pc.T - 1,
            "target_pre_activation": pre,
            "target_activation": act,
            "nodes": node_dicts,
            "edges": edges,
            "coverage": {
                "attribution_total": totals["signed"],
                "attribution_abs_total": totals["abs"],
                "attribution_in_graph": sum(x.attribution for x in ns),
                "attribution_abs_in_graph": sum(abs(x.attribution) for x in ns),
            },
            "layer_terms": terms,
        }
        rec["agreement"] = G.agreement(node_dicts)
        ids = {n["id"] for n in node_dicts}
        assert all(e["source"] in ids and e["target"] in ids for e in edges)
        return rec

    def _edges_exact_record(self, s: TargetSpec, ns: list[NodeRec], w: dict, terms: dict, layers: list[int],
                            node_dicts: list[dict]) -> list[dict]:
        """Edges with exact first-order weights, and each source's out-shares (set on node_dicts).

        A source's attribution A splits exactly (first order) over the next graph layer l_v:
        the graph's nodes there (its out-edges, before pruning), the other active features of
        l_v, and l_v's SAE error: out_shares {"graph", "other_features", "sae_error"} sum to 1."""
        if not layers:
            return []
        by_id = {n["id"]: n for n in node_dicts}
        top = layers[-1]
        feature_edges, fixed = [], []
        for x in ns:
            if x.layer == top:
                fixed.append({"source": x.id, "target": s.name, "weight": x.attribution})
        for kind in ("error", "bias"):
            fixed.append({"source": G.source_node_id(top, kind), "target": s.name, "weight": terms[str(top)][kind]})
        out_graph: dict[str, float] = {}
        for e in fixed:
            out_graph[e["source"]] = out_graph.get(e["source"], 0.0) + e["weight"]
        out_all: dict[str, float] = {e["source"]: e["weight"] for e in fixed}
        for k in range(1, len(layers)):
            lv, lu = layers[k], layers[k - 1]
            lower = [x for x in ns if x.layer == lu]
            for v in (x for x in ns if x.layer == lv):
                row = w.get((lv, v.uidx))
                if row is None:
                    continue
                for u in lower:
                    wt = row["features"].get(u.uidx, 0.0)
                    feature_edges.append({"source": u.id, "target": v.id, "weight": wt})
                    out_graph[u.id] = out_graph.get(u.id, 0.0) + wt
                for kind in ("error", "bias"):
                    src = G.source_node_id(lu, kind)
                    fixed.append({"source": src, "target": v.id, "weight": row[kind]})
                    out_graph[src] = out_graph.get(src, 0.0) + row[kind]
            whole = w.get((lv, None))
            if whole is not None:
                for u in lower:
                    out_all[u.id] = whole["features"].get(u.uidx, 0.0)
                for kind in ("error", "bias"):
                    out_all[G.source_node_id(lu, kind)] = whole[kind]
        for nid, n in by_id.items():
            if n["is_target"]:
                continue
            n.update(G.out_shares(n["attribution"], out_graph.get(nid, 0.0), out_all.get(nid)))
        feature_edges = G.prune_incoming(feature_edges, self.pc.top_k_per_layer, self.pc.coverage, keep_targets=set())
        return feature_edges + [e for e in fixed if e["weight"] != 0]

    def _edges_approx_record(self, s: TargetSpec, ns: list[NodeRec], raw: dict, layers: list[int]) -> list[dict]:
        """The old approximation (edge_weight: approx): raw(u->v) * A_v / act_v."""
        edges = []
        if not layers:
            return edges
        for x in ns:
            if x.layer == layers[-1]:
                edges.append({"source": x.id, "target": s.name, "weight": x.attribution, "raw": x.attribution})
        for k in range(1, len(layers)):
            lower = [x for x in ns if x.layer == layers[k - 1]]
            for v in (x for x in ns if x.layer == layers[k]):
                rv = raw.get((v.layer, v.uidx), {})
                scale = v.attribution / v.activation if v.activation else 0.0
                for u in lower:
                    r_uv = rv.get((u.layer, u.uidx))
                    if r_uv is None:
                        continue
                    edges.append({"source": u.id, "target": v.id, "weight": r_uv * scale, "raw": r_uv})
        return G.prune_incoming(edges, self.pc.top_k_per_layer, self.pc.coverage, keep_targets={s.name})


# ---------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------


def shard_of(items: list, shard: tuple[int, int] | None) -> list:
    if not shard:
        return items
    i, n = shard
    return items[i::n]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # started by torchrun: one disjoint share per rank
            return int(os.environ.get("RANK", "0")), world
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


def is_done(cfg: Config, feature: FeatureId, mhash: str) -> bool:
    p = pathway_path(cfg.cache, feature)
    if not p.is_file():
        return False
    try:
        import json

        meta = json.loads(p.read_text()).get("metadata", {})
    except (OSError, ValueError):
        return False  # unreadable: recompute
    return meta.get("method_hash") == mhash


def run(cfg: Config, targets: list[FeatureId], device: str, force: bool = False, chunk_size: int | None = None,
        progress=None) -> dict:
    """Compute and write pathways for `targets`; returns a summary."""
    from engine.model import load_model, load_tokenizer

    mhash = method_hash(cfg)
    todo = [t for t in targets if force or not is_done(cfg, t, mhash)]
    summary = {"requested": len(targets), "skipped_done": len(targets) - len(todo), "computed": 0, "files": []}
    if not todo:
        return summary
    todo.sort(key=lambda t: (t.layer, t.feature_id))
    t_load = time.perf_counter()
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device)
    load_s = time.perf_counter() - t_load
    eng = PathwayEngine(cfg, model, tok, device)
    if progress:
        progress.set_postfix(stage="encode")
    eng.encode_prompts(list(cfg.pathways.prompts), todo)
    chunk = chunk_size or max(1, cfg.pathways.chunk_size)
    for c0 in range(0, len(todo), chunk):
        part = todo[c0:c0 + chunk]
        if progress:
            progress.set_postfix(stage=f"L{part[0].layer}-L{part[-1].layer}")
        res = eng.run_chunk(part)
        for t in part:
            r = res[str(t)]
            out = with_schema({
                "feature": str(t),
                "layer": t.layer,
                "feature_id": t.feature_id,
                "metadata": {
                    "model": cfg.model.name_or_path,
                    "sae_source": cfg.sae.source,
                    "encode_convention": cfg.sae.convention,
                    "config_hash": cfg.hash("model", "sae", "pathways"),
                    "method_hash": mhash,
                    "device": device,
                    "dtype": cfg.model.dtype,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "timings_s": {"model_load": round(load_s, 3), "encode_prompts": round(eng.timings["encode_s"], 3),
                                  "chunk": round(r["chunk_seconds"], 3), "chunk_targets": r["chunk_targets"]},
                    "method": {
                        "attribution": "a * <d, dpre_t/dresid_post_l[p]> (gradient x activation, zero-ablation form)",
                        "position": "last prompt token",
                        "exclude_bos": cfg.pathways.exclude_bos,
                        "top_k_per_layer": cfg.pathways.top_k_per_layer,
                        "coverage": cfg.pathways.coverage,
                        "max_graph_layers": cfg.pathways.max_graph_layers,
                        "n_replay": cfg.pathways.n_replay,
                        "replay_mode": cfg.pathways.replay_mode,
                        "validate_min_abs_delta": cfg.pathways.validate_min_abs_delta,
                        "validate_min_rel_delta": cfg.pathways.validate_min_rel_delta,
                        "edge_weight": cfg.pathways.edge_weight,
                        "edge_weight_definition": (
                            "exact first-order path: sum_p <d_v, dpre_t/dh_lv[p]> dpre_v[p]/d(source); "
                            "SAE error and bias nodes per graph layer; into the target: A_u"
                            if cfg.pathways.edge_weight == "exact" else
                            "approximation: raw(u->v) * A_v / act_v, exact only when v is active at one position"),
                        "validation": ("linear_confirmed: replay changed the target's pre-activation with the "
                                       "predicted sign and enough size; changes_target_activation: the same for "
                                       "its gated activation; validated: both"),
                    },
                },
                "prompts": r["prompts"],
            }, version=PATHWAY_SCHEMA_VERSION)
            path = pathway_path(cfg.cache, t)
            write_export(cfg.cache, out, cfg.export)  # export first: a present result implies its export exists
            # no fsync per file: a rename is atomic against a killed process, and an unreadable
            # file (power loss) is recomputed on restart
            atomic_write_json(path, out, indent=None, fsync=False)
            summary["files"].append(str(path))
            summary["computed"] += 1
        if progress:
            progress.update(len(part))
    return summary
