"""Training the demo's small LLaMA on game transcripts, fast, with the real LLaMA-3 tokenizer.

The 128,256-row embedding and unembedding would dominate a small model's parameters and
its training time (a 128k-way softmax per token). Only a few hundred token ids ever occur
in the transcripts, so the model is trained on those ids only and then expanded to the
full vocabulary with zero rows for every other id. The training loss is *exactly* the
full-vocabulary cross-entropy of the expanded model: a zero unembedding row gives logit
0, so the k = 128,256 - V unused ids contribute k * exp(0) to the softmax denominator,
which the loss adds as one extra logit of value log(k).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from engine.fixtures import llama_config

FULL_VOCAB = 128256


@dataclass
class Sequences:
    ids: list[list[int]]  # full-vocabulary token ids: BOS + prompt + response + EOS
    n_prompt: list[int]  # tokens of BOS + prompt (the loss weight differs there)


def encode_transcripts(tok, pairs: list[tuple[str, str]]) -> Sequences:
    """Prompt and response are tokenised separately, as at generation time (the prompt's
    trailing space stays its own token; joined text would merge it into " 1")."""
    prompts = tok([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    responses = tok([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    ids = [p + r + [eos] for p, r in zip(prompts, responses)]
    return Sequences(ids, [len(p) for p in prompts])


def used_vocabulary(seqs: Sequences, extra: list[list[int]] = ()) -> list[int]:
    used = set()
    for s in list(seqs.ids) + list(extra):
        used.update(s)
    return sorted(used)


def small_model(n_layers: int, d_model: int, vocab: int, seed: int):
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the full vocabulary's special ids are out of this small range
    try:
        cfg = llama_config(n_layers, d_model, vocab, seed)
    finally:
        hf_logging.set_verbosity(level)
    cfg.initializer_range = 0.02
    cfg.pad_token_id = cfg.bos_token_id = cfg.eos_token_id = None  # ids of the full vocabulary
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _batch(seqs: Sequences, idx: list[int], remap, prompt_weight: float, decision_weight: float = 1.0,
           head: int = 1):
    import torch

    L = max(len(seqs.ids[i]) for i in idx)
    x = torch.zeros(len(idx), L, dtype=torch.long)
    mask = torch.zeros(len(idx), L, dtype=torch.long)
    w = torch.zeros(len(idx), L)
    for row, i in enumerate(idx):
        s = remap[torch.tensor(seqs.ids[i])]
        x[row, : len(s)] = s
        mask[row, : len(s)] = 1
        w[row, 1 : seqs.n_prompt[i]] = prompt_weight  # predicting prompt tokens (not BOS)
        w[row, seqs.n_prompt[i] : len(s)] = 1.0  # predicting response tokens and EOS
        # the choice ("1" or "2"), and with head > 1 the next tokens, up to where a bet's words part from a
        # stop's ("1\nI'll" / "2\nI stop"): under the logit-lens loss the answer must be taught to follow
        # the choice it sampled
        w[row, seqs.n_prompt[i] : min(len(s), seqs.n_prompt[i] + head)] = decision_weight
    return x, mask, w


def full_vocab_loss(logits, targets, weights, n_unused: int):
    """Weighted cross-entropy over used ids plus one logit log(n_unused) for the zero rows."""
    import torch

    extra = torch.full((*logits.shape[:-1], 1), math.log(n_unused), dtype=logits.dtype)
    lse = torch.logsumexp(torch.cat([logits, extra], dim=-1), dim=-1)
    nll = lse - logits.gather(-1, targets[..., None])[..., 0]
    return (nll * weights).sum() / weights.sum().clamp_min(1e-9), nll


def number_values(tok, used: list[int]) -> dict[int, int]:
    """{row in `used`: value} for the tokens that are whole numbers ("140", " 20")."""
    out = {}
    for row, tid in enumerate(used):
        text = tok.decode([tid]).strip()
        if text.isdigit():
            out[row] = int(text)
    return out


def init_number_embeddings(model, values: dict[int, int], seed: int, scale: float = 1.0) -> None:
    """Give number tokens a magnitude direction at init (as trained LLMs' embeddings have one),
    so the model need not discover from scratch that 140 > 20."""
    import torch

    if not values:
        return
    g = torch.Generator().manual_seed(seed + 17)
    emb = model.model.embed_tokens.weight
    u = torch.randn(emb.shape[1], generator=g)
    u = u / u.norm()
    rows = torch.tensor(list(values))
    mag = torch.tensor([math.log1p(v) for v in values.values()])
    mag = (mag - mag.mean()) / mag.std().clamp_min(1e-6)
    with torch.no_grad():
        emb[rows] += scale * emb[rows].norm(dim=-1, keepdim=True) * mag[:, None] * u


ANSWER_HEAD = 5  # the choice and the next 4 answer tokens ("1", "\n", "I", "'ll" / " stop"): where a bet and a stop part


def train(seqs: Sequences, used: list[int], *, n_layers: int, d_model: int, steps: int, batch_size: int,
          lr: float, prompt_weight: float, seed: int, eval_seqs: Sequences | None = None,
          numbers: dict[int, int] | None = None, decision_weight: float = 1.0, log_every: int = 10,
          lens_weight: float = 0.0, answer_head: int = ANSWER_HEAD, progress=None) -> tuple[object, list[dict]]:
    """Train the small-vocabulary model; returns (model, loss curve records).

    `lens_weight` > 0 adds, for every block but the first and the last (the last is the model's own
    output; the study never tests the first), the cross-entropy of the choice token read
    from that block's resid_post at the last prompt token through the model's own final norm and
    unembedding (the logit lens), so every layer holds the decision at that token. With it, the
    answer's first `answer_head` tokens weigh as much as the choice, so that the answer follows the
    choice it sampled."""
    import torch

    from engine.model import capture_resid_post

    torch.manual_seed(seed)
    head = answer_head if lens_weight > 0 else 1  # answer tokens weighted as the choice (_batch)
    V = len(used)
    remap = torch.full((FULL_VOCAB,), -1, dtype=torch.long)
    remap[torch.tensor(used)] = torch.arange(V)
    n_unused = FULL_VOCAB - V
    model = small_model(n_layers, d_model, V, seed).train()
    init_number_embeddings(model, numbers or {}, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))

    rng = random.Random(seed)
    order: list[int] = []
    curve: list[dict] = []
    eval_batch = None
    if eval_seqs is not None and eval_seqs.ids:
        eval_batch = _batch(eval_seqs, list(range(len(eval_seqs.ids))), remap, prompt_weight, decision_weight, head)
    lens_layers = list(range(1, n_layers - 1)) if lens_weight > 0 else []  # the blocks the study tests
    attn = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"  # fused attention for training; same function as eager
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(seqs.ids)))
            rng.shuffle(more)
            order += more
        # random batches: sorting them by length (less padding) was 1.4x faster per step, but
        # the quick plan's model then failed to learn the decision (docs/benchmarks.md)
        idx, order = order[:batch_size], order[batch_size:]
        x, _, w = _batch(seqs, idx, remap, prompt_weight, decision_weight, head)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        # right padding under a causal mask: no real token sees a pad, so no padding mask is
        # needed (the pads' loss weight is 0), and attention takes its faster causal path
        with capture_resid_post(model, lens_layers, detach=False, stop_after_last=False) as cap:
            logits = model(input_ids=x, use_cache=False).logits
        loss, nll = full_vocab_loss(logits[:, :-1], x[:, 1:], w[:, 1:], n_unused)
        lens_loss = torch.zeros(())
        if lens_layers:
            rows = torch.arange(len(idx))
            last = torch.tensor([seqs.n_prompt[i] - 1 for i in idx])
            choice = x[rows, last + 1]
            for l in lens_layers:
                lens = model.lm_head(model.model.norm(cap.resid[l][rows, last]))
                extra = torch.full((len(idx), 1), math.log(n_unused), dtype=lens.dtype)
                ce = torch.logsumexp(torch.cat([lens, extra], -1), -1) - lens.gather(-1, choice[:, None])[:, 0]
                lens_loss = lens_loss + ce.mean() / len(lens_layers)
        opt.zero_grad(set_to_none=True)
        (loss + lens_weight * lens_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            with torch.no_grad():
                resp = (w[:, 1:] >= 1.0).float()
                rec = {"step": step, "loss": round(float(loss), 5),
                       "response_loss": round(float((nll * resp).sum() / resp.sum()), 5),
                       "lr": round(lr_at(step), 6)}
                if lens_layers:
                    rec["lens_loss"] = round(float(lens_loss), 5)  # mean over the blocks, per transcript
                if eval_batch is not None:
                    rec["eval_response_loss"] = round(_eval(model, eval_batch, n_unused), 5)
                curve.append(rec)
        if progress is not None:
            progress.update(1)
    model.config._attn_implementation = attn  # saved as eager: the pathway step's vmapped backward needs it
    return model.eval(), curve


def _eval(model, batch, n_unused: int) -> float:
    import torch

    x, _, w = batch
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits
        _, nll = full_vocab_loss(logits[:, :-1], x[:, 1:], w[:, 1:], n_unused)
        resp = (w[:, 1:] >= 1.0).float()
        out = float((nll * resp).sum() / resp.sum())
    model.train()
    return out


def expand_to_full_vocab(small, used: list[int], seed: int):
    """The same network over all 128,256 ids: used rows copied, every other row zero."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = llama_config(small.config.num_hidden_layers, small.config.hidden_size, FULL_VOCAB, seed)
    with torch.device("meta"):
        full = LlamaForCausalLM(cfg)
    state = {k: v for k, v in small.state_dict().items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    idx = torch.tensor(used)
    emb = torch.zeros(FULL_VOCAB, cfg.hidden_size)
    emb[idx] = small.model.embed_tokens.weight.detach()
    head = torch.zeros(FULL_VOCAB, cfg.hidden_size)
    head[idx] = small.lm_head.weight.detach()
    state["model.embed_tokens.weight"] = emb
    state["lm_head.weight"] = head
    full.load_state_dict(state, assign=True, strict=True)
    full.model.rotary_emb.inv_freq = small.model.rotary_emb.inv_freq.clone()
    if hasattr(small.model.rotary_emb, "original_inv_freq"):
        full.model.rotary_emb.original_inv_freq = small.model.rotary_emb.original_inv_freq.clone()
    return full.eval()
