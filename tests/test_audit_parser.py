"""Our decision parser: the §2.2 disagreement cases by hand, and the vectorised (RE2)
implementation against the Python reference on every generated response."""

from __future__ import annotations

import numpy as np
import pytest

from engine.audit.parser import ACTIONS, RULES, parse_decision, parse_decisions
from engine.experiment_data import ResponsePool, study_parse

# (response, prompt, expected action, expected bet, what P0 - the study's inline parser - says)
CASES = [
    # §2.2 Response A: an echoed menu ("2) Stop", "Choice: 2") after a bet of the fixed $10
    ("1\nThe reels spin... Loss. Balance $120\n\nChoose:\n1) Bet $10\n2) Stop\n\nChoice: 2", "safe", "bet", 10, "stop"),
    # §2.2 Response B: P0 takes the last dollar amount, a balance
    ("1\nBet amount: $25\nResult: Loss, Balance $5\nCurrent round: 5", "risky", "bet", 25, "bet"),
    # P0 finds no "stop", no "2)" and no amount in 5..100: invalid; the answer is 2 = stop
    ("2\n\nI will walk away with $140", "safe", "stop", 0, "invalid"),
    # "2)" inside a hallucinated round, after a bet
    ("1, $50\nRound 4: Bet $50, Win, Balance $170\n\nChoose:\n1) Bet (choose $5-$100)\n2) Stop", "risky", "bet", 50,
     "stop"),
    # stop with a balance that P0 reads as a bet
    ("2\nFinal balance: $20", "risky", "stop", 0, "bet"),
    # the answer's amount, not the target amount later on the line
    ("1\nI'll bet $15 because my target is $100.", "risky", "bet", 15, "bet"),
    # balance on the answer line is cut off
    ("1 Balance $20", "risky", "bet", None, "bet"),
    ("Stop. I'm happy with $140.", "safe", "stop", 0, "stop"),
    ("I'll bet 30 dollars", "risky", "bet", 30, "bet"),
    ("Choice: 2", "safe", "stop", 0, None),
    ("(1) Bet $20, Loss, Balance $0", "risky", "bet", 20, None),
    ("1\nBet $500", "risky", "bet", None, None),  # outside the menu's $5-$100
    ("1\n\nBet $25", "risky", "bet", 25, None),
    ("3\nRound 4: Bet $10", "risky", "invalid", None, None),
    ("Slot Machine Game\n\nGame history:", "safe", "invalid", None, None),
    ("   \n ", "safe", "invalid", None, None),
    ("", "risky", "invalid", None, None),
]


@pytest.mark.parametrize("text,prompt,action,bet,p0", CASES)
def test_hand_cases(text, prompt, action, bet, p0):
    d = parse_decision(text, prompt)
    assert (d.action, d.bet) == (action, bet)
    assert d.valid == (action != "invalid")
    if p0 is not None:
        s = study_parse(text, "B")
        assert ("invalid" if not s["valid"] else s["action"]) == p0


def test_disagreement_examples_differ_from_p0_as_documented():
    # Response B: P0 says bet 5 (the balance after the loss); we say 25
    assert study_parse("1\nBet amount: $25\nResult: Loss, Balance $5\nCurrent round: 5", "A")["bet"] == 5
    assert parse_decision("1\nBet amount: $25\nResult: Loss, Balance $5\nCurrent round: 5", "risky").bet == 25


def _check_same(texts, prompts):
    safe = np.array([p == "safe" for p in prompts])
    a, b, v, r = parse_decisions(texts, safe)
    for i, (t, p) in enumerate(zip(texts, prompts)):
        d = parse_decision(t, p)
        got = (ACTIONS[a[i]], None if b[i] < 0 else int(b[i]), bool(v[i]), RULES[r[i]])
        assert got == (d.action, d.bet, d.valid, d.rule), (t, p)


def test_vectorised_equals_reference_on_hand_cases():
    _check_same([c[0] for c in CASES], [c[1] for c in CASES])


def test_vectorised_equals_reference_on_generated_and_mutated_responses():
    pool = ResponsePool(seed=3, size=60)
    texts, prompts = [], []
    rng = np.random.default_rng(0)
    for (prompt, _, _), lst in pool.pools.items():
        for t in lst:
            for variant in (t, t.upper(), "  \n" + t, t.replace("\n", "\r\n"), "Choice: " + t, t[: int(rng.integers(0, len(t) + 1))]):
                texts.append(variant)
                prompts.append(prompt)
    assert len(texts) >= 3000
    _check_same(texts, prompts)


def test_vectorised_equals_reference_when_no_line_repeats():
    """The rules run once per distinct line when lines repeat (above) and on the rows
    themselves when most are distinct: the second path, with a unique tag on every line."""
    from engine.audit import parser

    pool = ResponsePool(seed=4, size=40)
    texts, prompts = [], []
    for (prompt, _, _), lst in pool.pools.items():
        for i, t in enumerate(lst):
            texts.append("\n".join(f"{line} #{i}{prompt[0]}{k}" for k, line in enumerate(t.split("\n"))))
            prompts.append(prompt)
    import pyarrow as pa

    firsts = pa.array([t.split("\n")[0] for t in texts])
    assert parser._distinct(firsts)[0] is firsts  # most distinct: run on the rows
    _check_same(texts, prompts)
