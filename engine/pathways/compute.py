"""Gradient attribution, multi-hop edges and replay validation (plan step 3).

Notation (docs/science.md has the derivation): h_l = resid_post of block l (output of
`model.model.layers[l]`), T the prompt length, q = T-1 the last prompt token. A target
feature t at layer L has pre-activation pre_t = e_t . h_L[q] + b_t (e_t its encoder row in
residual units, see engine/sae.py). An upstream feature i at layer l < L, active at
position p with activation a_{l,i,p}, contributes a_{l,i,p} d_{l,i} to h_l[p] (d its
decoder direction in residual units); the rest of h_l (other features, SAE error, bias)
is held fixed.

Node attribution  A(i,l,p) = a_{l,i,p} <d_{l,i}, dpre_t/dh_l[p]>, the first-order estimate of
what removing a_{l,i,p} d_{l,i} from h_l[p] would do, negated: replay Δ ≈ -A. A node's
`attribution` is the sum over its active positions.

Work shared between targets is done once per prompt: the encoding of every layer (sparse
codes, decoder and encoder rows of the active features only), and per chunk of targets a
single forward pass whose autograd graph serves every backward pass. Backward passes are
batched with `torch.autograd.grad(..., is_grads_batched=True)` (one vmapped
vector-Jacobian product for many targets), truncated at the highest target layer.
Replays start from the cached h_l and run only the blocks l+1..L, many interventions per
batch, and one intervention serves every target that asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from engine.model import _StopForward, capture_resid_post, decoder_layers, run_blocks
from engine.sae import SAE


@dataclass
class LayerCodes:
    """Sparse SAE codes of one layer on one prompt, with the rows attribution needs."""

    layer: int
    pos: torch.Tensor  # (K,) position of each active entry
    inv: torch.Tensor  # (K,) index into `features` of each entry
    act: torch.Tensor  # (K,) activation, float32
    features: torch.Tensor  # (U,) unique active feature ids
    dec: torch.Tensor  # (U, d) decoder directions, residual units (compute dtype)
    enc: torch.Tensor  # (U, d) encoder rows, residual units (compute dtype)
    enc_bias: torch.Tensor  # (U,)
    error: torch.Tensor  # (T, d) SAE error h - x_hat (float32)
    dec_bias: torch.Tensor  # (d,)
    threshold: float

    def entries_of(self, u: int) -> torch.Tensor:
        """Indices of the entries of unique feature u (its active positions)."""
        return torch.nonzero(self.inv == u, as_tuple=False).flatten()


@dataclass
class TargetSpec:
    name: str  # "L12-3456"
    layer: int
    feature_id: int
    enc: torch.Tensor  # (d,) encoder row e_t (compute dtype)
    bias: float
    threshold: float


@dataclass
class PromptCodes:
    """Everything about one prompt that does not depend on the targets."""

    name: str
    text: str
    ids: torch.Tensor  # (1, T)
    tokens: list[str]
    layers: dict[int, LayerCodes] = field(default_factory=dict)
    #: activation of every active feature at the last token, per layer: {layer: {feature_id: act}}
    last_token: dict[int, dict[int, float]] = field(default_factory=dict)

    @property
    def T(self) -> int:
        return int(self.ids.shape[1])


# ---------------------------------------------------------------------------
# Encoding (once per prompt)
# ---------------------------------------------------------------------------


def acc_dtype(compute_dtype):
    """Dot products accumulate in float32 (float64 when the model runs in float64)."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def encode_layer(sae: SAE, h: torch.Tensor, exclude_positions: Iterable[int], compute_dtype) -> LayerCodes:
    """Sparse codes of h (T, d) with this layer's SAE; excluded positions carry no entries."""
    acc = acc_dtype(compute_dtype)
    with torch.no_grad():
        pre = sae.pre_activation(h)
        a = sae.gate(pre)
        recon = sae.decode(a).to(acc)
        error = h.to(acc) - recon
        mask = a > 0
        for p in exclude_positions:
            mask[p] = False
        pos, feat = torch.nonzero(mask, as_tuple=True)
        act = a[pos, feat].to(acc)
        features, inv = torch.unique(feat, return_inverse=True)
        dec = sae.decoder_rows(features).to(compute_dtype)
        enc, enc_bias = sae.encoder_rows(features)
    return LayerCodes(
        layer=sae.layer, pos=pos, inv=inv, act=act, features=features, dec=dec,
        enc=enc.to(compute_dtype), enc_bias=enc_bias.to(acc), error=error,
        dec_bias=sae.dec_bias.to(acc), threshold=float(sae.threshold),
    )


# ---------------------------------------------------------------------------
# Forward with a graph, batched backward passes
# ---------------------------------------------------------------------------


class GradGraph:
    """One forward pass with autograd, reused by every backward pass of a chunk."""

    def __init__(self, model, ids: torch.Tensor, layers: Iterable[int]):
        self.layers = sorted(set(layers))
        inner = getattr(model, "model", model)
        with torch.enable_grad(), capture_resid_post(model, self.layers, detach=False, stop_after_last=True) as cap:
            # Parameters are frozen: the graph is rooted at the embedding output.
            emb = inner.embed_tokens(ids).detach().requires_grad_(True)
            try:
                inner(inputs_embeds=emb, use_cache=False)
            except _StopForward:
                pass
        self.h = cap.resid  # {layer: (1, T, d)} with grad history

    def vjp(self, seeds: dict[int, torch.Tensor], inputs: list[int]) -> dict[int, torch.Tensor]:
        """Batched vector-Jacobian products.

        seeds: {layer L: (B, T, d)} cotangents on h_L (rows are independent problems).
        Returns {l: (B, T, d)} = sum_L d<seed_L, h_L>/dh_l for each l in inputs."""
        outs = [self.h[L] for L in seeds]
        grads = [seeds[L].unsqueeze(1).to(self.h[L].dtype) for L in seeds]  # (B, 1, T, d)
        ins = [self.h[l] for l in inputs]
        res = torch.autograd.grad(outs, ins, grad_outputs=grads, retain_graph=True, allow_unused=True,
                                  is_grads_batched=True)
        B = next(iter(seeds.values())).shape[0]
        out = {}
        for l, g in zip(inputs, res):
            out[l] = (torch.zeros((B, *self.h[l].shape[1:]), dtype=self.h[l].dtype, device=self.h[l].device)
                      if g is None else g[:, 0])
        return out


def contract(g: torch.Tensor, codes: LayerCodes, max_bytes: int = 256 * 2**20, encoder: bool = False) -> torch.Tensor:
    """Per-entry attribution a_k <d_k, g[b, pos_k]> for every active entry: (B, K); with
    encoder=True, <e_k, g[b, pos_k]> instead (a tangent read by the encoder rows: the change
    of each entry's pre-activation).

    One GEMM of the gradient with the decoder rows of the *active* features only (never the
    whole decoder), then a gather at the active (position, feature) pairs; split over
    features so the (B, T, U-chunk) product stays under `max_bytes`."""
    B, T, d = g.shape
    K = codes.pos.shape[0]
    U = codes.features.shape[0]
    acc = codes.act.dtype
    out = torch.empty((B, K), dtype=acc, device=g.device)
    if K == 0:
        return out
    g2 = g.reshape(B * T, d).to(acc)
    step = max(1, int(max_bytes // max(1, B * T * torch.finfo(acc).bits // 8)))
    rows = codes.enc if encoder else codes.dec
    for u0 in range(0, U, step):
        u1 = min(U, u0 + step)
        P = (g2 @ rows[u0:u1].to(acc).T).reshape(B, T, u1 - u0)
        if u0 == 0 and u1 == U:
            out[:] = P[:, codes.pos, codes.inv] * (1.0 if encoder else codes.act)
        else:
            sel = (codes.inv >= u0) & (codes.inv < u1)
            out[:, sel] = P[:, codes.pos[sel], codes.inv[sel] - u0] * (1.0 if encoder else codes.act[sel])
    return out


def layer_terms(g: torch.Tensor, codes: LayerCodes, h: torch.Tensor, entry_attr: torch.Tensor,
                bos: bool) -> dict[str, torch.Tensor]:
    """First-order decomposition of <g, h_l> over the layer's parts (per batch row).

    features = sum of entry attributions; error = <g, SAE error>; bias = <g, decoder bias>,
    all over non-BOS positions; bos = <g[0], h[0]> when BOS is excluded."""
    gf = g.to(codes.act.dtype)
    start = 1 if bos else 0
    out = {
        "features": entry_attr.sum(1),
        "error": torch.einsum("btd,td->b", gf[:, start:], codes.error[start:]),
        "bias": torch.einsum("btd,d->b", gf[:, start:], codes.dec_bias),
    }
    if bos:
        out["bos"] = gf[:, 0] @ h[0].to(gf.dtype)
    return out


def feature_totals(entry_attr: torch.Tensor, codes: LayerCodes) -> torch.Tensor:
    """Per-entry values (B, K) summed per unique feature: (B, U)."""
    B = entry_attr.shape[0]
    U = codes.features.shape[0]
    return torch.zeros((B, U), dtype=entry_attr.dtype, device=entry_attr.device).index_add_(1, codes.inv, entry_attr)


def source_contribution(codes: LayerCodes, source: int | str, T: int, bos: bool) -> torch.Tensor:
    """What a source adds to h_l (T, d), in the accumulation dtype: a feature (index into
    codes.features) a_k d at each of its active positions; "error" the SAE error and "bias"
    the decoder bias at every position that carries codes (all but BOS when it is excluded)."""
    acc = codes.act.dtype
    d = codes.dec.shape[1]
    if source == "error":
        c = codes.error.to(acc).clone()
    elif source == "bias":
        c = codes.dec_bias.to(acc).expand(T, d).clone()
    else:
        ent = codes.entries_of(int(source))
        c = torch.zeros((T, d), dtype=acc, device=codes.dec.device)
        c.index_add_(0, codes.pos[ent], codes.act[ent, None] * codes.dec[int(source)].to(acc))
        return c
    if bos:
        c[0] = 0.0
    return c


# ---------------------------------------------------------------------------
# Replays
# ---------------------------------------------------------------------------


@dataclass
class Intervention:
    layer: int
    feature_index: int  # index into LayerCodes.features
    kind: str = "zero"  # zero: remove scale * a d where active; patch: set at the last token
    scale: float = 1.0
    patch_value: float | None = None


def apply_intervention(h: torch.Tensor, codes: LayerCodes, iv: Intervention, T: int) -> None:
    """Edit one row h (T, d) in place, keeping the SAE error and every other feature."""
    d = codes.dec[iv.feature_index].to(h.dtype)
    if iv.kind == "zero":
        ent = codes.entries_of(iv.feature_index)
        for k in ent.tolist():
            h[codes.pos[k]] -= (iv.scale * codes.act[k]).to(h.dtype) * d
    elif iv.kind == "patch":
        q = T - 1
        ent = codes.entries_of(iv.feature_index)
        cur = 0.0
        for k in ent.tolist():
            if int(codes.pos[k]) == q:
                cur = float(codes.act[k])
        h[q] += torch.tensor((iv.patch_value or 0.0) - cur, dtype=h.dtype, device=h.device) * d
    else:
        raise ValueError(iv.kind)


def replay(model, h_clean: torch.Tensor, codes: LayerCodes, interventions: list[Intervention],
           targets: list[TargetSpec], T: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target pre-activations, clean and their change under each intervention.

    Starts from the cached h_l (1, T, d) of codes.layer and runs blocks l+1..max target
    layer only, `batch_size` interventions per pass; row 0 of every batch is the clean
    run, so each delta is taken within one batch. Returns (clean (n_targets,),
    deltas (n_interventions, n_targets)), float64."""
    l = codes.layer
    top = max(t.layer for t in targets)
    keep = sorted({t.layer for t in targets})
    q = T - 1
    E = torch.stack([t.enc for t in targets]).double()  # (n_t, d)
    layer_of = [t.layer for t in targets]
    bias = torch.tensor([t.bias for t in targets], dtype=torch.float64, device=E.device)
    deltas = torch.empty((len(interventions), len(targets)), dtype=torch.float64, device=E.device)
    clean = None
    i = 0
    bs = max(1, batch_size)
    while i < len(interventions) or clean is None:
        chunk = interventions[i:i + bs]
        try:
            h = h_clean.detach().expand(len(chunk) + 1, -1, -1).clone()
            for j, iv in enumerate(chunk, start=1):
                apply_intervention(h[j], codes, iv, T)
            with torch.no_grad():
                res = run_blocks(model, h, l + 1, top, keep=keep) if top > l else {l: h}
        except torch.cuda.OutOfMemoryError:
            if bs == 1:
                raise
            bs = max(1, bs // 2)  # shrink and retry instead of crashing
            torch.cuda.empty_cache()
            continue
        # pre[r, t] = e_t . h_{L_t}[r, q] + b_t
        last = {L: res[L][:, q].double() for L in keep}
        pre = torch.stack([last[L] @ E[k] for k, L in enumerate(layer_of)], dim=1) + bias
        if clean is None:
            clean = pre[0].clone()
        deltas[i:i + len(chunk)] = pre[1:] - pre[0]
        i += len(chunk)
    return clean.cpu(), deltas.cpu()  # one copy; callers read single values


def n_blocks(model) -> int:
    return len(decoder_layers(model))
