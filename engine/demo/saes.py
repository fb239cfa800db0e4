"""Residual SAEs for every layer of the demo model, in the LlamaScope layout.

Each SAE is trained on resid_post of its block (engine.model.forward_resid_post, the
output of `model.model.layers[L]`) over game transcripts, BOS excluded as LlamaScope's
statistics are, in the space of the study's encode convention:

    x_s = x * s_in,  s_in = sqrt(d_model) / dataset_average_activation_norm.in (measured)
    a   = ReLU(W_E x_s + b_E),   x_s_hat = W_D a + b_D
    loss = mean ||x_s - x_s_hat||^2 / d_model + l1 * mean sum_i a_i ||W_D[:, i]||

so `engine.sae.load_sae(..., convention="study")` reproduces the trained encoder exactly.
`jump_relu_threshold` (used by the `jumprelu`/`saelens` conventions) is calibrated after
training: the largest threshold, in the jumprelu convention's unit-decoder-norm units,
that raises the fraction of variance unexplained by at most `THRESHOLD_FVU_SLACK`.
"""

from __future__ import annotations

import math
from pathlib import Path

THRESHOLD_FVU_SLACK = 0.01
FOLDER_TEMPLATE = "Llama3_1-8B-Base-L{layer}R-8x"


def pad_right(token_lists: list[list[int]]):
    """(ids, attention mask) of shape (B, T), right-padded with id 0 (masked out)."""
    import torch

    T = max(len(s) for s in token_lists)
    ids = torch.zeros(len(token_lists), T, dtype=torch.long)
    mask = torch.zeros(len(token_lists), T, dtype=torch.long)
    for i, s in enumerate(token_lists):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def collect_resid_post(model, token_lists: list[list[int]], layers: list[int], batch_size: int = 32):
    """{layer: (N, d_model)} resid_post at every non-BOS position of every sequence, and the
    (sequence, position) of each row."""
    import torch

    from engine.model import forward_resid_post

    out: dict[int, list] = {l: [] for l in layers}
    where: list[tuple[int, int]] = []
    with torch.no_grad():
        for start in range(0, len(token_lists), batch_size):
            chunk = token_lists[start:start + batch_size]
            ids, mask = pad_right(chunk)
            res = forward_resid_post(model, ids, layers, attention_mask=mask)
            keep = mask.bool().clone()
            keep[:, 0] = False  # BOS
            for l in layers:
                out[l].append(res[l][keep].float())
            for i, s in enumerate(chunk):
                where += [(start + i, p) for p in range(1, len(s))]
    return {l: torch.cat(v) for l, v in out.items()}, where


def collect_last_token(model, tok, prompts: list[str], layers: list[int], batch_size: int = 64):
    """{layer: (n_prompts, d_model)} resid_post at each prompt's last token (the decision token)."""
    import torch

    from engine.model import forward_resid_post

    out: dict[int, list] = {l: [] for l in layers}
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            ids_list = tok(prompts[start:start + batch_size], add_special_tokens=True)["input_ids"]
            ids, mask = pad_right(ids_list)
            last = torch.tensor([len(s) - 1 for s in ids_list])
            res = forward_resid_post(model, ids, layers, attention_mask=mask)
            rows = torch.arange(len(ids_list))
            for l in layers:
                out[l].append(res[l][rows, last].float())
    return {l: torch.cat(v) for l, v in out.items()}


def train_sae(X, d_sae: int, *, steps: int, batch_size: int, lr: float, l1: float, seed: int,
              focus=None, focus_fraction: float = 0.0):
    """Train one SAE on raw resid_post rows X (N, d); returns weights and the measured norm.

    With `focus` rows (the decision token), each batch takes `focus_fraction` of its rows from them
    and the rest from X; the norm is measured on that mixture, the SAE's training distribution."""
    import torch

    g = torch.Generator().manual_seed(seed)
    N, d = X.shape
    n_focus = int(round(batch_size * focus_fraction)) if focus is not None and len(focus) else 0
    norm_in = float(X.norm(dim=-1).mean())
    if n_focus:
        f = n_focus / batch_size
        norm_in = f * float(focus.norm(dim=-1).mean()) + (1 - f) * norm_in
    s_in = math.sqrt(d) / norm_in
    Xs = X * s_in
    Fs = focus * s_in if n_focus else None
    W_D = torch.randn(d, d_sae, generator=g)
    W_D = W_D / W_D.norm(dim=0, keepdim=True) * 0.5
    W_D = torch.nn.Parameter(W_D)
    W_E = torch.nn.Parameter(W_D.detach().T.clone())
    b_E = torch.nn.Parameter(torch.zeros(d_sae))
    b_D = torch.nn.Parameter(Xs.mean(0).clone())
    params = [W_E, b_E, W_D, b_D]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    curve = []
    for step in range(steps):
        idx = torch.randint(0, N, (batch_size - n_focus,), generator=g)
        x = Xs[idx]
        if n_focus:
            x = torch.cat([x, Fs[torch.randint(0, len(Fs), (n_focus,), generator=g)]])
        a = torch.relu(x @ W_E.T + b_E)
        x_hat = a @ W_D.T + b_D
        mse = ((x - x_hat) ** 2).sum(-1).mean() / d
        # l1 ramps in over the first 10% of steps, as usual for SAE training
        ramp = min(1.0, (step + 1) / max(1, steps // 10))
        sparsity = (a * W_D.norm(dim=0)).sum(-1).mean()
        loss = mse + ramp * l1 * sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            a = a.detach()
            curve.append({"step": step, "mse": round(float(mse.detach()), 6), "l0": round(float((a > 0).float().sum(-1).mean()), 3)})
    weights = {
        "encoder.weight": W_E.detach().contiguous(),
        "encoder.bias": b_E.detach().contiguous(),
        "decoder.weight": W_D.detach().contiguous(),
        "decoder.bias": b_D.detach().contiguous(),
    }
    return weights, norm_in, curve


def evaluate(sae, X) -> dict:
    """Mean L0, mean relative error ||x - x_hat|| / ||x||, and fraction of variance unexplained."""
    import torch

    with torch.no_grad():
        a = sae.encode(X)
        x_hat = sae.decode(a)
        err = X - x_hat
        rel = (err.norm(dim=-1) / X.norm(dim=-1).clamp_min(1e-12)).mean()
        fvu = (err ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
        return {"l0": float((a > 0).float().sum(-1).mean()), "relative_error": float(rel), "fvu": float(fvu),
                "dead_fraction": float(((a > 0).sum(0) == 0).float().mean())}


def calibrate_threshold(weights: dict, hp: dict, X) -> tuple[float, dict]:
    """Largest jumprelu threshold whose FVU is within THRESHOLD_FVU_SLACK of the plain ReLU's."""
    import torch

    from engine.sae import build_sae

    base = build_sae(*(weights[k] for k in ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")),
                     {**hp, "jump_relu_threshold": 0.0}, layer=-1, convention="jumprelu")
    with torch.no_grad():
        pre = base.pre_activation(X)
        pos = pre[pre > 0]
    if pos.numel() == 0:
        return 0.0, {}
    ref = evaluate(base, X)
    best, best_eval = 0.0, ref
    for q in torch.linspace(0.02, 0.9, 45):
        theta = float(torch.quantile(pos[: 200_000], q))
        base.threshold = theta
        ev = evaluate(base, X)
        if ev["fvu"] <= ref["fvu"] + THRESHOLD_FVU_SLACK:
            best, best_eval = theta, ev
        else:
            break
    return best, best_eval


def write_sae(folder: Path, layer: int, weights: dict, norm_in: float, threshold: float, extra: dict) -> Path:
    from safetensors.torch import save_file

    from engine.schema import AtomicFile, atomic_write_json

    d_model, d_sae = weights["decoder.weight"].shape
    out = Path(folder) / FOLDER_TEMPLATE.format(layer=layer)
    with AtomicFile(out / "checkpoints" / "final.safetensors") as tmp:
        save_file(weights, str(tmp))
    hp = {
        "d_model": int(d_model),
        "d_sae": int(d_sae),
        "expansion_factor": int(d_sae // d_model),
        "hook_point_in": f"blocks.{layer}.hook_resid_post",
        "hook_point_out": f"blocks.{layer}.hook_resid_post",
        "act_fn": "jumprelu",
        "jump_relu_threshold": threshold,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_in},
        "sparsity_include_decoder_norm": True,
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        "dtype": "torch.float32",
        "demo": True,
        **extra,
    }
    atomic_write_json(out / "hyperparams.json", hp)
    return out
