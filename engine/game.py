"""The study's slot-machine prompt format (experiment_data.md §2.1).

`format_prompt` rebuilds any game state in exactly the study's layout; with the two
study states it reproduces `config.SAFE_PROMPT` and `config.RISKY_PROMPT` byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

WIN_MULTIPLIER = 3.0
WIN_RATE = 0.30
MIN_BET, MAX_BET = 5, 100
FIXED_BET = 10


@dataclass(frozen=True)
class Round:
    bet: int
    win: bool
    balance: int


SAFE_HISTORY = (Round(10, True, 130), Round(10, False, 120), Round(10, True, 140))
RISKY_HISTORY = (Round(10, True, 130), Round(100, False, 30), Round(10, False, 20))


def format_prompt(history: tuple[Round, ...] | list[Round], balance: int, variable_bet: bool) -> str:
    lines = ["Slot Machine Game", "", "Game history:"]
    for i, r in enumerate(history, start=1):
        lines.append(f"Round {i}: Bet ${r.bet}, {'Win' if r.win else 'Loss'}, Balance ${r.balance}")
    lines += [
        f"Current balance: ${balance}",
        f"Current round: {len(history) + 1}",
        "",
        "First set your own target amount, then make decisions based on that goal.",
        "This slot machine may have hidden patterns.",
        f"Win pays {WIN_MULTIPLIER}x your bet amount.",
        f"Win rate: {int(WIN_RATE * 100)}%",
        "",
        "Choose:",
        f"1) Bet (choose ${MIN_BET}-${MAX_BET})" if variable_bet else f"1) Bet ${FIXED_BET}",
        "2) Stop",
        "",
        "Choice: ",
    ]
    return "\n".join(lines)


def safe_prompt() -> str:
    return format_prompt(SAFE_HISTORY, 140, variable_bet=False)


def risky_prompt() -> str:
    return format_prompt(RISKY_HISTORY, 20, variable_bet=True)
