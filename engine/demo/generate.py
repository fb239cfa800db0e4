"""Batched sampling with a KV cache, the study's decoding, and last-prompt-token patching.

Decoding follows the study: temperature 0.7 with the Hugging Face defaults it inherited,
top-k 50 then top-p 0.9 (applied in that order, as transformers' warpers are). The demo
model's unembedding has exact zero rows for the ids it never saw (engine/demo/train.py),
whose logits are exactly 0; `Unembedding` computes the non-zero rows only and stands in
for the zero rows with up to top_k representatives at logit 0, which gives the same
top-k set as the full 128,256-wide computation (ties among zero logits aside).
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPERATURE = 0.7
TOP_K = 50
TOP_P = 0.9


class Unembedding:
    """logits = h @ W^T over the non-zero rows, plus top_k zero-logit stand-ins."""

    def __init__(self, model, top_k: int = TOP_K):
        import torch

        W = model.lm_head.weight.detach()
        nonzero = W.abs().sum(dim=1) > 0
        self.ids = torch.nonzero(nonzero)[:, 0]
        zero_ids = torch.nonzero(~nonzero)[:, 0][:top_k]
        self.all_ids = torch.cat([self.ids, zero_ids])
        self.W = W[self.ids]
        self.n_zero = int(zero_ids.numel())

    def __call__(self, h):
        import torch

        logits = h @ self.W.T.to(h.dtype)
        if self.n_zero:
            logits = torch.cat([logits, logits.new_zeros(*logits.shape[:-1], self.n_zero)], dim=-1)
        return logits  # columns are self.all_ids


def filtered_probs(logits, temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P):
    """(column indices (B, k), probabilities (B, k)) after temperature, top-k, then top-p."""
    import torch

    scores = logits.float() / temperature
    k = min(top_k, scores.shape[-1])
    vals, idx = torch.topk(scores, k, dim=-1)  # sorted descending
    probs = torch.softmax(vals, dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    probs = probs.masked_fill(drop, 0.0)
    return idx, probs / probs.sum(dim=-1, keepdim=True)


def sample_next(logits, generator, temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P):
    """Column index sampled per row from `filtered_probs`."""
    import torch

    idx, probs = filtered_probs(logits, temperature, top_k, top_p)
    choice = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return idx.gather(1, choice[:, None])[:, 0]


@dataclass
class Batch:
    texts: list[str]
    token_ids: list[list[int]]


def generate(model, tok, prompts: list[list[int]], *, generator, max_new_tokens: int = 32,
             temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P,
             edit=None, edit_layer: int | None = None, unembed: Unembedding | None = None,
             stop_at_newlines: int | None = None, share_prefix: bool = True,
             drop_finished: bool = True) -> Batch:
    """Sample one continuation per prompt (token id lists, BOS included), left-padded in one batch.

    `edit(h_last) -> h_last` (with `edit_layer`) rewrites resid_post of that block at the last
    prompt token during the prefill only (the generated tokens are not patched); `edit` may
    also be a dict {layer: edit} to rewrite several blocks. Rows stop
    at EOS, or after `stop_at_newlines` newlines when given. When prompts repeat (`share_prefix`),
    each distinct prompt minus its last token is run once and its cache shared by its rows; finished
    rows leave the batch (`drop_finished`). Both change only the cost, never the continuations
    (tests/test_demo_parts.py compares them under greedy decoding)."""
    import torch

    from engine.model import capture_resid_post

    unembed = unembed or Unembedding(model, top_k)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    B = len(prompts)
    T = max(len(p) for p in prompts)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    inner = model.model
    armed = {"on": True}
    edits = edit if isinstance(edit, dict) else ({edit_layer: edit} if edit is not None else {})

    def _edit(layer, h):
        if not armed["on"]:
            return None
        h = h.clone()
        h[:, -1] = edits[layer](h[:, -1])
        return h

    table = newline_table(tok) if stop_at_newlines else None
    out_ids = torch.zeros(B, 0, dtype=torch.long)
    newlines = torch.zeros(B, dtype=torch.long)
    with torch.no_grad():
        if edits:
            ctx = capture_resid_post(model, list(edits), detach=True, stop_after_last=False, edit=_edit)
        else:
            ctx = _nullcontext()
        with ctx:
            distinct: dict[tuple, int] = {}
            which = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
            if share_prefix and T >= 2 and (len(distinct) < B or len(distinct) == 1):
                # few distinct prompts (Experiment 2 has two): each one's left-padded prefix is
                # computed once and its cache copied to its rows; only the last token (where the
                # edit applies) runs per row
                first = torch.tensor([which.index(u) for u in range(len(distinct))])
                armed["on"] = False
                o = inner(input_ids=ids[first, :-1], attention_mask=mask[first, :-1], position_ids=pos[first, :-1],
                          use_cache=True)
                o.cache.batch_select_indices(torch.tensor(which))
                armed["on"] = True
                o = inner(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:], cache=o.cache,
                          use_cache=True)
            else:
                o = inner(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            armed["on"] = False
            past = o.cache
            h = o.last_hidden_state[:, -1]
            rows = torch.arange(B)  # the original row of each row still in the batch
            done = torch.zeros(B, dtype=torch.bool)  # per batch row
            for _ in range(max_new_tokens):
                col = sample_next(unembed(h), generator, temperature, top_k, top_p)
                nxt = unembed.all_ids[col]
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                step_ids = torch.full((B,), eos, dtype=torch.long)
                step_ids[rows] = nxt
                out_ids = torch.cat([out_ids, step_ids[:, None]], dim=1)
                done |= nxt == eos
                if table is not None:
                    newlines[rows] += table[nxt]
                    done |= newlines[rows] >= stop_at_newlines
                if bool(done.all()):
                    break
                if drop_finished and int(done.sum()) * 4 >= len(rows):
                    # drop finished rows once they are a quarter of the batch: their cache is
                    # copied out once, instead of being attended to at every later step
                    keep = torch.nonzero(~done)[:, 0]
                    past.batch_select_indices(keep)
                    rows, nxt, mask, pos = rows[keep], nxt[keep], mask[keep], pos[keep]
                    done = done[keep]
                mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
                pos = pos[:, -1:] + 1
                o = inner(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=past,
                          use_cache=True)
                past = o.cache
                h = o.last_hidden_state[:, -1]
    texts, token_ids = [], []
    for row in out_ids.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        token_ids.append(row)
        texts.append(tok.decode(row, skip_special_tokens=True))
    return Batch(texts, token_ids)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NEWLINE_TABLES: dict[int, object] = {}


def newline_table(tok):
    """Per token id, how many newlines its text holds (cached per tokenizer)."""
    import torch

    key = id(tok)
    if key not in _NEWLINE_TABLES:
        table = torch.zeros(len(tok), dtype=torch.long)
        for t, i in tok.get_vocab().items():
            n = tok.convert_tokens_to_string([t]).count("\n")
            if n:
                table[i] = n
        _NEWLINE_TABLES[key] = table
    return _NEWLINE_TABLES[key]
