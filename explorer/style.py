"""One palette for the whole explorer, so a colour means the same thing on every page.

Prompts and feature directions: safe = green, risky = orange (colour-blind-safe Dark2
pair). Signed quantities (attribution, edge weight, risky minus safe): red positive,
blue negative, white at zero (RdBu reversed, as in Neuronpedia-style graph viewers), a
scale that never uses the prompt colours.
"""

from __future__ import annotations

SAFE = "#1b9e77"
RISKY = "#d95f02"
MIXED = "#7570b3"
NEUTRAL = "#9e9e9e"
POSITIVE = "#b2182b"
NEGATIVE = "#2166ac"
TARGET = "#f2b701"

PROMPT_COLOURS = {"safe": SAFE, "risky": RISKY, "custom": MIXED, "difference": NEUTRAL}
DIRECTION_COLOURS = {"safe": SAFE, "risky": RISKY, "mixed": MIXED}
DIVERGING = "RdBu_r"  # with cmid=0


def prompt_colour(name: str) -> str:
    return PROMPT_COLOURS.get(name, NEUTRAL)


def direction_colour(direction: str) -> str:
    return DIRECTION_COLOURS.get(direction, NEUTRAL)


def signed_rgba(sign: int, alpha: float) -> str:
    """Edge colour: red for positive weights, blue for negative ones."""
    return f"rgba(178,24,43,{alpha:.2f})" if sign > 0 else f"rgba(33,102,172,{alpha:.2f})"
