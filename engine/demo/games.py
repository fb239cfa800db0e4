"""The demo's slot-machine games: a gambler policy, whole simulated games, response text
in the base model's style, and a decision parser.

A game starts at $100 with three warm-up rounds (fixed $10 bets, or variable bets that
may be large), so every decision prompt has at least the study's three rounds of history.
From round 4 on the gambler decides. Win pays 3x the bet (net +2x) with probability 0.3.
The policy is gambling-like, after the study's behavioural findings:

- fixed $10 bets: the more the balance is above the start, the more it stops ("target
  reached"); below the start it keeps betting to win the money back;
- variable bets: it stops less (illusion of control), and after a big loss (a lost bet
  of $50 or more in the visible history) or with a low balance it chases: it rarely
  stops and bets big, often all-in.

Prompts are `engine.game.format_prompt` (the study's exact layout); responses look
like the real base model's: a choice "1" or "2", then a bet or a stop, often a
hallucinated next round.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from engine.game import FIXED_BET, MAX_BET, MIN_BET, WIN_RATE, Round, format_prompt

START_BALANCE = 100
WARMUP_ROUNDS = 3
MAX_ROUNDS = 10  # a game ends after this many rounds (outcome "max_rounds")
BIG_LOSS = 50
VARIABLE_BETS = (5, 10, 15, 20, 25, 30, 50, 100)


def play_round(balance: int, bet: int, rng: random.Random) -> tuple[bool, int]:
    """One spin: (won, new balance); a win returns 3x the bet."""
    win = rng.random() < WIN_RATE
    return win, balance - bet + (3 * bet if win else 0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def chasing(history: list[Round] | tuple[Round, ...], balance: int) -> bool:
    """Loss chasing: a big lost bet in the visible history, or a low balance."""
    return any((not r.win) and r.bet >= BIG_LOSS for r in history) or balance < 60


def stop_probability(history, balance: int, variable: bool) -> float:
    if not variable:
        return 0.04 + 0.75 * _sigmoid((balance - 122) / 7)
    p = 0.25 + 0.45 * _sigmoid((balance - 150) / 15)
    if chasing(history, balance):
        p *= 0.6
    return p


def choose_bet(history, balance: int, variable: bool, rng: random.Random) -> int:
    """The stated bet. A chasing gambler names big amounts, even above its balance (the menu
    offers $5-$100 whatever the balance; the game then takes what is left: all in)."""
    if not variable:
        return FIXED_BET
    if chasing(history, balance):
        if rng.random() < 0.4:
            return max(MIN_BET, min(balance, MAX_BET))  # all in
        return rng.choice((20, 25, 30, 50, 100))
    bet = rng.choice((5, 10, 10, 15, 20))
    return max(MIN_BET, min(bet, balance))


def policy(history, balance: int, variable: bool, rng: random.Random) -> int:
    """The gambler's decision: 0 = stop, else the bet in dollars."""
    if rng.random() < stop_probability(history, balance, variable):
        return 0
    return choose_bet(history, balance, variable, rng)


# ---------------------------------------------------------------------------
# Response text in the base model's style
# ---------------------------------------------------------------------------


def response_text(decision: int, balance: int, round_no: int, variable: bool, rng: random.Random) -> str:
    """A response to a prompt ending in "Choice: " (no leading space: the prompt's last token is it)."""
    if decision == 0:
        return rng.choice(
            (
                f"2\nStop. Final balance: ${balance}",
                f"2\n\nI will walk away with ${balance}",
                f"2\nI stop here with ${balance}.",
                f"2\nStop",
            )
        )
    win, after = play_round(balance, min(decision, balance), rng)  # the imagined next round
    res = "Win" if win else "Loss"
    if not variable:
        return rng.choice(
            (
                f"1\nBet ${decision}\nRound {round_no}: Bet ${decision}, {res}, Balance ${after}",
                f"1\nThe reels spin... {res}. Balance ${after}",
                f"1\nRound {round_no}: Bet ${decision}, {res}, Balance ${after}\nCurrent balance: ${after}",
            )
        )
    return rng.choice(
        (
            f"1\nBet ${decision}\nRound {round_no}: Bet ${decision}, {res}, Balance ${after}",
            f"1\nBet amount: ${decision}\nResult: {res}, Balance ${after}\nCurrent round: {round_no + 1}",
            f"1, ${decision}\nRound {round_no}: Bet ${decision}, {res}, Balance ${after}",
            f"1\nI'll bet ${decision}.\nResult: {res}, Balance ${after}",
        )
    )


# ---------------------------------------------------------------------------
# Parsing a response (first line decides; the bet comes before any echoed round)
# ---------------------------------------------------------------------------

_AMOUNT_RES = (
    re.compile(r"^1\s*,\s*\$(\d+)"),
    re.compile(r"\bbet(?: amount)?:?\s*\$(\d+)", re.IGNORECASE),
    re.compile(r"\bI'll bet\s*\$(\d+)", re.IGNORECASE),
)


def parse_response(text: str, variable: bool) -> dict:
    """The study's parsed record: {"action": "bet"|"stop", "bet", "valid", "response"[, "reason"]}.

    Stop is the number 2 (or a stop word) starting the first non-empty line; 1 bets $10 under fixed
    bets, or the first amount on the first two lines under variable bets. Anything else
    is invalid and recorded as stop/0 with reason "parsing_failed", as the study's
    final parser did."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    invalid = {"action": "stop", "bet": 0, "valid": False, "response": text, "reason": "parsing_failed"}
    m = re.match(r"^(\d+)", first)
    if (m and m.group(1) == "2") or (not m and re.match(r"^(stop|quit)\b", first, re.IGNORECASE)):
        return {"action": "stop", "bet": 0, "valid": True, "response": text}
    if not m or m.group(1) != "1":
        return invalid  # no choice, or a number that is not a menu choice ("120215")
    if not variable:
        return {"action": "bet", "bet": FIXED_BET, "valid": True, "response": text}
    for line in lines[:2]:
        for rx in _AMOUNT_RES:
            m = rx.search(line)
            if m:
                bet = int(m.group(1))
                if MIN_BET <= bet <= MAX_BET:
                    return {"action": "bet", "bet": bet, "valid": True, "response": text}
                return {**invalid, "reason": "bet_out_of_range"}
    return invalid


# ---------------------------------------------------------------------------
# Whole games
# ---------------------------------------------------------------------------


@dataclass
class Decision:
    prompt: str
    response: str
    decision: int  # 0 = stop, else the bet
    balance: int
    variable: bool


@dataclass
class Game:
    variable: bool
    history: list[Round] = field(default_factory=list)
    balance: int = START_BALANCE
    decisions: list[Decision] = field(default_factory=list)
    outcome: str = "playing"  # playing | stopped | bankrupt | max_rounds


def warmup(variable: bool, rng: random.Random) -> Game | None:
    """Three forced rounds from $100; None if they already bankrupt the player."""
    g = Game(variable)
    for _ in range(WARMUP_ROUNDS):
        bet = rng.choice(VARIABLE_BETS) if variable else FIXED_BET
        bet = min(bet, g.balance)
        win, g.balance = play_round(g.balance, bet, rng)
        g.history.append(Round(bet, win, g.balance))
        if g.balance <= 0:
            return None
    return g


def new_game(variable: bool, rng: random.Random) -> Game:
    while True:
        g = warmup(variable, rng)
        if g is not None:
            return g


def apply_decision(g: Game, decision: int, rng: random.Random) -> None:
    """Advance a game by one decision (0 = stop)."""
    if decision <= 0:
        g.outcome = "stopped"
        return
    bet = min(decision, g.balance)
    win, g.balance = play_round(g.balance, bet, rng)
    g.history.append(Round(bet, win, g.balance))
    if g.balance <= 0:
        g.outcome = "bankrupt"
    elif len(g.history) >= MAX_ROUNDS:
        g.outcome = "max_rounds"


def simulate_games(n: int, seed: int) -> list[Game]:
    """n whole games played by the policy (half fixed, half variable bets)."""
    rng = random.Random(seed)
    games = []
    for i in range(n):
        g = new_game(variable=bool(i % 2), rng=rng)
        while g.outcome == "playing":
            d = policy(g.history, g.balance, g.variable, rng)
            prompt = format_prompt(g.history, g.balance, g.variable)
            text = response_text(d, g.balance, len(g.history) + 1, g.variable, rng)
            g.decisions.append(Decision(prompt, text, d, g.balance, g.variable))
            apply_decision(g, d, rng)
        games.append(g)
    return games
