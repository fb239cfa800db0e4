"""A naive token-view baseline: what a per-feature loop (as the study's plan V5 writes it) does.

Per feature: load its layer's SAE, take the decoder direction through the final norm and the
unembedding, one forward pass per prompt, one unpadded forward pass per sampled response, and
one full forward pass (with a patch hook) per prompt, context and intervention, plus an
unpatched one. Only `scripts/bench_tokens.py` uses it, to time the engine against it and to
check that both give the same answers.
"""

from __future__ import annotations

import torch


def _capture(model, ids, layer):
    got = {}

    def hook(module, args, output):
        got["h"] = (output[0] if isinstance(output, tuple) else output).detach()

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        model.model(torch.as_tensor([ids]))
    finally:
        handle.remove()
    return got["h"][0]


def _patched_log_probs(model, ids, layer, pos, delta):
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[0, pos] += delta
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        logits = model(torch.as_tensor([ids]), logits_to_keep=1).logits[0, -1]
    finally:
        handle.remove()
    return torch.log_softmax(logits.float(), -1)


@torch.no_grad()
def run(cfg, model, tok, features: list[tuple[int, int]], samples: list[tuple[str, str]], top_n: int = 20,
        amplify_factor: float = 2.0) -> dict:
    from engine.sae import load_sae

    g, W_U = model.model.norm.weight.float(), model.lm_head.weight.float()
    one, two = tok("1", add_special_tokens=False)["input_ids"][0], tok("2", add_special_tokens=False)["input_ids"][0]
    cont = tok(cfg.tokens.amount_context, add_special_tokens=False)["input_ids"]
    prompt_ids = {p: tok(t)["input_ids"] for p, t in cfg.prompts.items()}
    out = {}
    for layer, fid in features:
        sae = load_sae(cfg.sae, layer)
        d = sae.decoder_rows(torch.tensor([fid]))[0].float()
        vals = W_U @ (g * d)
        top = torch.topk(vals, top_n)
        acts = {p: sae.encode(_capture(model, ids, layer))[:, fid] for p, ids in prompt_ids.items()}
        m = max(float(a[1:].max()) for a in acts.values())
        for prompt, response in samples:
            ids = prompt_ids[prompt] + tok(response, add_special_tokens=False)["input_ids"]
            a = sae.encode(_capture(model, ids, layer))[len(prompt_ids[prompt]):, fid]
            if len(a):
                m = max(m, float(a.max()))
        decisions = {}
        for p, ids in prompt_ids.items():
            pos = len(ids) - 1
            a = float(acts[p][pos])
            base = _patched_log_probs(model, ids, layer, pos, torch.zeros_like(d))
            _patched_log_probs(model, ids + cont, layer, pos, torch.zeros_like(d))  # the amount context's baseline
            for name, v in (("ablate", 0.0), ("amplify", amplify_factor * m)):
                if name == "amplify" and m <= 0:
                    continue
                lp = _patched_log_probs(model, ids, layer, pos, (v - a) * d)
                _patched_log_probs(model, ids + cont, layer, pos, (v - a) * d)
                decisions[(p, name)] = float((lp[one] - lp[two]) - (base[one] - base[two]))
        out[f"L{layer}-{fid}"] = {"promoted": top.indices.tolist(), "decisions": decisions}
        del sae
    return out
