"""The model-side token views, batched over all features of a layer.

- `FeatureBank`: the encoder rows, biases and decoder directions of the selected features
  of one layer, cut from its SAE once (the SAE itself is then freed).
- `logit_lens`: (d_i * g) @ W_U^T, with g the final RMSNorm weight and W_U the unembedding.
- `decision_effects`: log-probabilities of decision tokens after adding (v - a) d_i to
  resid_post at the last prompt token, re-running only the blocks above the feature's layer.
- `TopActivations`: running top-k of per-response maxima over batched, padded forward passes.

All of this runs under torch.no_grad() in float32 arithmetic (activations are cast up from
the model's dtype before encoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FeatureBank:
    layer: int
    feature_ids: list[int]
    enc: torch.Tensor  # (F, d_model) encoder rows in residual units
    enc_bias: torch.Tensor  # (F,)
    threshold: float
    dec: torch.Tensor  # (F, d_model) decoder directions in residual units

    @classmethod
    def from_sae(cls, sae, feature_ids: list[int], device) -> "FeatureBank":
        idx = torch.as_tensor(feature_ids, dtype=torch.long, device=sae.device)
        enc, bias = sae.encoder_rows(idx)
        dec = sae.decoder_rows(idx)
        f32 = dict(device=device, dtype=torch.float32)
        return cls(sae.layer, list(feature_ids), enc.to(**f32).contiguous(), bias.to(**f32),
                   float(sae.threshold), dec.to(**f32).contiguous())

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_model) raw resid_post → (..., F) pre-activations (the SAE's own formula)."""
        return x.to(self.enc.dtype) @ self.enc.T + self.enc_bias

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activation(x)
        return torch.where(pre > self.threshold, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))


# ---------------------------------------------------------------------------
# Logit lens
# ---------------------------------------------------------------------------


def unembedding(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(final RMSNorm weight g (d,), unembedding W_U (V, d)) of a LLaMA-style model."""
    inner = getattr(model, "model", model)
    return inner.norm.weight, model.lm_head.weight


def logit_lens(dirs: torch.Tensor, norm_weight: torch.Tensor, W_U: torch.Tensor, top_n: int,
               chunk: int = 64) -> dict[str, torch.Tensor]:
    """Top promoted / suppressed tokens of (dirs * g) @ W_U^T, with the vocabulary mean and sd.

    Returns CPU tensors: top_values/top_ids (F, k) descending, bottom_values/bottom_ids (F, k)
    ascending, mean (F,), std (F,)."""
    g = norm_weight.to(dtype=torch.float32, device=dirs.device)
    out = {k: [] for k in ("top_values", "top_ids", "bottom_values", "bottom_ids", "mean", "std")}
    W = W_U.to(device=dirs.device, dtype=torch.float32)  # one float32 copy (2 GB for LLaMA-3.1-8B), not one per chunk
    k = min(top_n, W.shape[0])
    for s in range(0, dirs.shape[0], chunk):
        d = dirs[s:s + chunk].to(torch.float32) * g
        vals = d @ W.T
        tv, ti = torch.topk(vals, k, dim=1)
        bv, bi = torch.topk(vals, k, dim=1, largest=False)
        out["top_values"].append(tv.cpu())
        out["top_ids"].append(ti.cpu())
        out["bottom_values"].append(bv.cpu())
        out["bottom_ids"].append(bi.cpu())
        out["mean"].append(vals.mean(dim=1).cpu())
        out["std"].append(vals.std(dim=1).cpu())
        del vals
    return {k2: torch.cat(v) for k2, v in out.items()}


# ---------------------------------------------------------------------------
# Patched decision tokens
# ---------------------------------------------------------------------------


def final_log_probs(model, h_last: torch.Tensor) -> torch.Tensor:
    """log_softmax(lm_head(norm(h))) in float32 for (R, d) residuals at the last block's output."""
    inner = getattr(model, "model", model)
    logits = model.lm_head(inner.norm(h_last))
    return torch.log_softmax(logits.float(), dim=-1)


def patched_log_probs(model, resid: torch.Tensor, layer: int, position: int, deltas: torch.Tensor,
                      token_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Log-probs of `token_ids` at the last position, one row per delta.

    resid: (1, T, d) resid_post of block `layer` for the sequence; deltas: (R, d) added at
    `position` (row 0 may be zeros for the baseline). Blocks layer+1.. run on the patched
    residual, so positions before `position` are untouched (causal attention)."""
    from engine.model import n_layers, run_blocks

    depth = n_layers(model)
    T = resid.shape[1]
    rows = []
    for s in range(0, deltas.shape[0], batch_size):
        dl = deltas[s:s + batch_size]
        h = resid.expand(dl.shape[0], T, resid.shape[2]).clone()
        h[:, position] = (h[:, position].float() + dl.to(h.device)).to(h.dtype)
        if layer + 1 <= depth - 1:
            h = run_blocks(model, h, layer + 1, depth - 1)
        lp = final_log_probs(model, h[:, -1])
        rows.append(lp[:, token_ids.to(lp.device)].cpu())
    return torch.cat(rows)


# ---------------------------------------------------------------------------
# Top activations over logged responses
# ---------------------------------------------------------------------------


#: Activation histogram bins: log-spaced, HIST_PER_DECADE per decade over [HIST_LO, HIST_HI];
#: a positive activation below HIST_LO counts in the first bin, one above HIST_HI in the last.
HIST_LO, HIST_HI, HIST_PER_DECADE = 1e-2, 1e3, 10


def histogram_edges() -> torch.Tensor:
    decades = round(torch.log10(torch.tensor(HIST_HI / HIST_LO)).item())
    return torch.logspace(torch.log10(torch.tensor(HIST_LO)).item(), torch.log10(torch.tensor(HIST_HI)).item(),
                          decades * HIST_PER_DECADE + 1, dtype=torch.float64)


class TopActivations:
    """Per feature: the k responses with the highest activation on one of their response
    tokens (one example per response), with a window of activations around that token, and
    a histogram of the activation over every response token (a response that occurs w times
    in the sample counts w times: identical responses are run once, with weight w)."""

    def __init__(self, n_features: int, k: int, context: int):
        self.k, self.c = k, context
        self.edges = histogram_edges()
        self.hist = torch.zeros(n_features, len(self.edges) - 1, dtype=torch.float64)
        self.zero = torch.zeros(n_features, dtype=torch.float64)
        self.values = torch.full((n_features, 0), float("-inf"))
        self.samples = torch.zeros((n_features, 0), dtype=torch.long)
        self.positions = torch.zeros((n_features, 0), dtype=torch.long)
        self.windows = torch.zeros((n_features, 0, 2 * context + 1))
        self.active_tokens = torch.zeros(n_features, dtype=torch.long)
        self.max_activation = torch.zeros(n_features)
        self.n_tokens = 0

    def add(self, acts: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor, sample_index: torch.Tensor,
            weights: torch.Tensor | None = None) -> None:
        """acts (B, T, F); valid (B, T) marks response tokens; lengths (B,) real tokens per row
        (the rest is padding); sample_index (B,) numbers the responses; weights (B,) how many
        sampled responses each row stands for (default 1)."""
        acts = acts.float()
        B, T, F = acts.shape
        w = torch.ones(B, device=acts.device) if weights is None else weights.to(acts.device, torch.float32)
        wt = valid.float() * w[:, None]  # (B, T) weight of each response token, 0 for prompt and padding
        masked = torch.where(valid[..., None], acts, torch.full((), float("-inf"), device=acts.device))
        self.active_tokens += torch.einsum("bt,btf->f", wt, (acts > 0).float()).round().long().cpu()
        self.n_tokens += int(round(float(wt.sum())))
        self._histogram(acts, wt)
        best, pos = masked.max(dim=1)  # (B, F)
        self.max_activation = torch.maximum(self.max_activation, best.clamp_min(0).max(dim=0).values.cpu())
        offs = torch.arange(-self.c, self.c + 1, device=acts.device)
        idx = pos[..., None] + offs  # (B, F, W)
        ok = (idx >= 0) & (idx < lengths.to(acts.device)[:, None, None])  # context may reach into the prompt
        gathered = torch.gather(acts.permute(0, 2, 1), 2, idx.clamp(0, T - 1))  # (B, F, W)
        windows = torch.where(ok, gathered, torch.full((), float("nan"), device=acts.device))
        vals = torch.cat([self.values, best.T.cpu()], dim=1)
        samp = torch.cat([self.samples, sample_index[None, :].expand(F, B).cpu()], dim=1)
        posn = torch.cat([self.positions, pos.T.cpu()], dim=1)
        win = torch.cat([self.windows, windows.permute(1, 0, 2).cpu()], dim=1)
        k = min(self.k, vals.shape[1])
        top = torch.topk(vals, k, dim=1).indices
        self.values = torch.gather(vals, 1, top)
        self.samples = torch.gather(samp, 1, top)
        self.positions = torch.gather(posn, 1, top)
        self.windows = torch.gather(win, 1, top[..., None].expand(-1, -1, win.shape[2]))

    def _histogram(self, acts: torch.Tensor, wt: torch.Tensor) -> None:
        """Add the weighted response tokens of (B, T, F) activations to the per-feature histogram."""
        F = acts.shape[2]
        keep = wt > 0
        x = acts[keep]  # (N, F)
        w = wt[keep].double()  # (N,)
        if not x.shape[0]:
            return
        pos = x > 0
        self.zero += ((~pos).double() * w[:, None]).sum(0).cpu()
        edges = self.edges.to(x.device, torch.float32)
        nb = len(edges) - 1
        b = (torch.bucketize(x.clamp_min(float(edges[0])), edges, right=True) - 1).clamp(0, nb - 1)  # (N, F)
        flat = (b + torch.arange(F, device=x.device)[None, :] * nb)[pos]
        ww = w[:, None].expand(-1, F)[pos]
        self.hist += torch.zeros(F * nb, dtype=torch.float64, device=x.device).index_add_(0, flat, ww).view(F, nb).cpu()

    def histogram(self, j: int) -> dict:
        counts = [int(round(c)) for c in self.hist[j].tolist()]
        return {"edges": [float(e) for e in self.edges.tolist()], "counts": counts,
                "zero": int(round(float(self.zero[j]))), "total": int(self.n_tokens),
                "scale": "log", "weighting": "response tokens of the sample (repeated responses counted each time)"}
