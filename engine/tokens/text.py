"""Readable token strings and the simple word splitter of the behavioural-words view.

Tokens are decoded one id at a time with the model's tokenizer (so a leading space
belongs to its token, as LLaMA-3 writes it) and made visible: space "␣", newline "⏎",
tab "⇥", carriage return "␍". A token that is only part of a UTF-8 character (byte-level
BPE pieces of emoji or CJK text) decodes to U+FFFD; it is shown as its bytes, "⟨f0 9f⟩".
"""

from __future__ import annotations

import re
from functools import lru_cache

VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}

#: The simple word splitter: lower-cased words (with an inner apostrophe) and amounts
#: ("$10", "10", "2.5"), in reading order. Everything else (punctuation, ")") is dropped.
WORD_RE = re.compile(r"\$?\d+(?:\.\d+)?|[a-z]+(?:'[a-z]+)?")


def split_words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def visible(text: str) -> str:
    if text == "":
        return "∅"
    return "".join(VISIBLE.get(c, c) for c in text)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table, used by byte-level BPE (LLaMA-3)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Decodes token ids to (raw text, visible text), caching per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, str]] = {}

    def __call__(self, token_id: int) -> tuple[str, str]:
        token_id = int(token_id)
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self.tokenizer.decode([token_id])
            shown = visible(raw)
            if "\ufffd" in raw:
                shown = self._bytes(token_id) or shown
            hit = (raw, shown)
            self._cache[token_id] = hit
        return hit

    def raw(self, token_id: int) -> str:
        return self(token_id)[0]

    def shown(self, token_id: int) -> str:
        return self(token_id)[1]

    def _bytes(self, token_id: int) -> str | None:
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        table = _byte_decoder()
        if not isinstance(piece, str) or any(c not in table for c in piece):
            return None
        return "⟨" + " ".join(f"{table[c]:02x}" for c in piece) + "⟩"
