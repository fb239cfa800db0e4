"""Naive pathway baseline: what implementation plan V4 describes, made correct, one target at a time.

Per target and prompt: its own forward pass with `output_hidden_states=True` (with the
resid_post index fixed: hidden_states[L+1], and a hook for the last block, whose
hidden_states entry is normed), a dense encode of every layer with its SAE, its own
backward pass from the target's pre-activation, a dense attribution (gradient times the
whole decoder) per layer, the same node selection as the engine, and one full forward
pass with a hook per replayed node. No multi-hop edges (the plan had none).

Used only by scripts/bench_pathways.py to time the engine against it and to check that
both find the same nodes and replay changes.
"""

from __future__ import annotations

import torch

from engine.pathways.graph import select_indices


def naive_pathway(model, tokenizer, saes: dict, target_layer: int, target_id: int, prompt: str,
                  top_k: int, coverage: float, n_replay: int, exclude_bos: bool = True) -> dict:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    n_blocks = len(model.model.layers)
    T = ids.shape[1]
    q = T - 1
    start = 1 if exclude_bos else 0
    # forward with hidden states; the last block's output comes from a hook
    last_out = {}
    h_last = model.model.layers[n_blocks - 1].register_forward_hook(
        lambda m, a, o: last_out.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.enable_grad():
            emb = model.model.embed_tokens(ids).detach().requires_grad_(True)  # weights are frozen
            out = model(inputs_embeds=emb, output_hidden_states=True, use_cache=False)
    finally:
        h_last.remove()
    hs = list(out.hidden_states)

    def resid(l):
        return last_out["h"] if l == n_blocks - 1 else hs[l + 1]

    for l in range(target_layer):
        resid(l).retain_grad()
    sae_t = saes[target_layer]
    pre_t = sae_t.pre_activation(resid(target_layer)[0, q])[target_id]
    pre_t.backward()
    nodes = []
    for l in range(target_layer):
        sae = saes[l]
        with torch.no_grad():
            h = resid(l)[0].detach()
            acts = sae.encode(h)  # (T, d_sae), dense
            D = (sae.W_dec * sae.dec_gain).T  # (d_sae, d): the whole decoder
            g = resid(l).grad[0]
            attr = (g.to(D.dtype) @ D.T) * acts  # (T, d_sae)
            attr[:start] = 0
            per_feature = attr.sum(0)
        scores = per_feature.tolist()
        for u in select_indices(scores, top_k, coverage):
            pos = torch.nonzero(acts[start:, u] > 0).flatten() + start
            nodes.append({"id": f"L{l}-{u}", "layer": l, "feature_id": u, "attribution": scores[u],
                          "positions": pos.tolist(), "acts": acts[pos, u].tolist()})
    pre_clean = float(pre_t.detach())
    for n in sorted(nodes, key=lambda n: -abs(n["attribution"]))[:n_replay]:
        sae = saes[n["layer"]]
        d = (sae.W_dec[:, n["feature_id"]] * sae.dec_gain[n["feature_id"]])
        captured = {}

        def ablate(m, a, o, n=n, d=d):
            h = (o[0] if isinstance(o, tuple) else o).clone()
            for p, act in zip(n["positions"], n["acts"]):
                h[0, p] -= act * d.to(h.dtype)
            return (h, *o[1:]) if isinstance(o, tuple) else h

        def grab(m, a, o):
            captured["h"] = o[0] if isinstance(o, tuple) else o

        hooks = [model.model.layers[n["layer"]].register_forward_hook(ablate),
                 model.model.layers[target_layer].register_forward_hook(grab)]
        try:
            with torch.no_grad():
                model(ids, use_cache=False)  # one full forward pass per intervention
        finally:
            for hk in hooks:
                hk.remove()
        n["replay_delta"] = float(sae_t.pre_activation(captured["h"][0, q])[target_id]) - pre_clean
    model.zero_grad(set_to_none=True)
    return {"target_pre_activation": pre_clean, "nodes": nodes}
