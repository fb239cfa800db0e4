"""Our decision parser: bet / stop / invalid and the bet amount, from a response's text.

The study's three parsers disagree (experiment_data.md §2.2): P0 reads "2)" anywhere as
stop (fooled by echoed menus) and takes the *last* dollar amount (a balance); P2 reads an
echoed "Choice: 2" anywhere. The base model answers the prompt's "Choice: " first and then
hallucinates more rounds and menus, so only the start of the reply is the decision:

1. blank reply -> invalid (`empty`).
2. The first non-blank line starts with a choice number, optionally after "Choice:" or "(":
   "2" -> stop (`choice_2`); "1" -> bet (`choice_1_*`); any other number -> invalid (`other_choice`).
3. Else it starts with a stop phrase ("stop", "quit", "walk away", "cash out", "fold", "pass",
   "end the game", optionally after "I will / I'll / I want to / I choose to / I decide to /
   I would like to") -> stop (`stop_word`), or with "bet"/"wager" -> bet (`bet_word_*`).
4. Else invalid (`no_decision`).

Bet amount: the safe prompt offers only "Bet $10", so a safe bet is $10 (`*_fixed`). On the
risky prompt the amount is the first of `$N`, `N dollars` or `bet|wager|stake|amount ... N`
in the answer: the rest of the first line after the choice, then up to two more lines,
stopping at the first echoed line (Round N, Game history, Current balance/round, Choose,
Choice, Slot Machine, Result, Balance, Win rate/pays, "1)", "2)"). Within a line, text from
balance/result/win/loss/round onwards is ignored. An amount in [min_bet, max_bet] gives
`*_amount`; outside it `*_bad_amount` (bet, amount null); none `*_no_amount` (bet, amount null).

Two implementations of the same rules: `parse_decision` (Python `re`, one reply: the
reference) and `parse_decisions` (pyarrow's RE2 kernels over a whole column: what the audit
runs). The regular expressions are shared and avoid constructs on which the engines differ
(`\\d`, `\\s`, `\\b`, `$`); tests check the two agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ACTIONS = ("bet", "stop", "invalid")
ACTION_BET, ACTION_STOP, ACTION_INVALID = 0, 1, 2

WS = r"[ \t\r\n\f\v]"
LINES_RE = r"^" + WS + r"*(?P<l1>[^\n]*)(?:\n(?P<l2>[^\n]*))?(?:\n(?P<l3>[^\n]*))?"
BLANK_RE = r"^" + WS + r"*$"
CHOICE_RE = r"(?i)^[ \t]*(?:choice[ \t]*:?[ \t]*)?\(?(?P<num>[0-9]+)(?P<rest>[^0-9][^\n]*|)$"
_LEAD = r"(?i)^[ \t]*(?:i[ \t]*(?:will|'ll|want to|choose to|decide to|would like to)[ \t]+)?"
STOP_WORD_RE = _LEAD + r"(?:stop|quit|walk away|cash out|fold|pass|end the game)"
BET_WORD_RE = _LEAD + r"(?:bet|wager)"
ECHO_RE = (r"(?i)^[ \t]*(?:round[ \t]*[0-9]|game history|current balance|current round|choose|choice"
           r"|slot machine|result|balance|win rate|win pays|[12][ \t]*\))")
CUT_RE = r"(?i)(?:balance|result|win|loss|round|won|lost)[^\n]*"
AMOUNT_RE = (r"(?i)(?:\$[ \t]*(?P<a>[0-9]{1,7})|(?P<b>[0-9]{1,7})[ \t]*dollars"
             r"|(?:bet|wager|stake|amount)[^0-9$\n]{0,12}(?P<c>[0-9]{1,7}))")

# parse_rule values (stored as strings in trials.parquet)
RULES = (
    "empty", "choice_2", "choice_1_fixed", "choice_1_amount", "choice_1_bad_amount", "choice_1_no_amount",
    "other_choice", "stop_word", "bet_word_fixed", "bet_word_amount", "bet_word_bad_amount",
    "bet_word_no_amount", "no_decision",
)
FIXED_BET = 10


@dataclass(frozen=True)
class Decision:
    action: str  # bet | stop | invalid
    bet: int | None
    valid: bool
    rule: str


_c = {name: re.compile(rx) for name, rx in dict(
    lines=LINES_RE, blank=BLANK_RE, choice=CHOICE_RE, stop=STOP_WORD_RE, bet=BET_WORD_RE, echo=ECHO_RE,
    cut=CUT_RE, amount=AMOUNT_RE).items()}


def _amount(segment: str) -> str | None:
    seg = _c["cut"].sub("", segment, count=1)
    m = _c["amount"].search(seg)
    if not m:
        return None
    return m.group("a") or m.group("b") or m.group("c")


def parse_decision(response: str | None, prompt: str, min_bet: int = 5, max_bet: int = 100) -> Decision:
    """The reference implementation (one reply)."""
    if response is None or _c["blank"].match(response):
        return Decision("invalid", None, False, "empty")
    m = _c["lines"].match(response)
    l1, l2, l3 = m.group("l1"), m.group("l2") or "", m.group("l3") or ""
    ch = _c["choice"].match(l1)
    if ch:
        num, rest = ch.group("num"), ch.group("rest")
        if num == "2":
            return Decision("stop", 0, True, "choice_2")
        if num != "1":
            return Decision("invalid", None, False, "other_choice")
        prefix, first = "choice_1", rest
    elif _c["stop"].match(l1):
        return Decision("stop", 0, True, "stop_word")
    elif _c["bet"].match(l1):
        prefix, first = "bet_word", l1
    else:
        return Decision("invalid", None, False, "no_decision")
    if prompt == "safe":
        return Decision("bet", FIXED_BET, True, f"{prefix}_fixed")
    segments = [first]
    if not _c["echo"].match(l2):
        segments.append(l2)
        if not _c["echo"].match(l3):
            segments.append(l3)
    for seg in segments:
        amt = _amount(seg)
        if amt is not None:
            v = int(amt)
            if min_bet <= v <= max_bet:
                return Decision("bet", v, True, f"{prefix}_amount")
            return Decision("bet", None, True, f"{prefix}_bad_amount")
    return Decision("bet", None, True, f"{prefix}_no_amount")


def parse_decisions(responses, prompt_is_safe, min_bet: int = 5, max_bet: int = 100):
    """Vectorised parser over a pyarrow string array.

    `prompt_is_safe` is a numpy bool array. Returns numpy arrays (action code int8, bet
    int32 with -1 for none, valid bool, rule code int8 indexing RULES)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    resp = responses if isinstance(responses, (pa.Array, pa.ChunkedArray)) else pa.array(responses, pa.string())
    if isinstance(resp, pa.ChunkedArray):
        resp = resp.combine_chunks()
    n = len(resp)
    resp = pc.fill_null(resp, "")
    rule = np.full(n, RULES.index("no_decision"), dtype=np.int8)
    bet = np.full(n, -1, dtype=np.int32)
    safe = np.asarray(prompt_is_safe, dtype=bool)

    def np_bool(a) -> "np.ndarray":
        return np.asarray(pc.fill_null(a, False).to_numpy(zero_copy_only=False), dtype=bool)

    blank = np_bool(pc.match_substring_regex(resp, BLANK_RE))
    lines = pc.extract_regex(resp, LINES_RE)
    l1, l2, l3 = (pc.fill_null(pc.struct_field(lines, k), "") for k in ("l1", "l2", "l3"))
    ch = pc.extract_regex(l1, CHOICE_RE)
    has_choice = np_bool(pc.is_valid(ch))
    num = pc.fill_null(pc.struct_field(ch, "num"), "").to_numpy(zero_copy_only=False)
    rest = pc.fill_null(pc.struct_field(ch, "rest"), "")
    is2 = has_choice & (num == "2")
    is1 = has_choice & (num == "1")
    other = has_choice & ~is1 & ~is2
    stop_w = ~has_choice & np_bool(pc.match_substring_regex(l1, STOP_WORD_RE))
    bet_w = ~has_choice & ~stop_w & np_bool(pc.match_substring_regex(l1, BET_WORD_RE))
    betting = (is1 | bet_w) & ~blank

    rule[is2] = RULES.index("choice_2")
    rule[other] = RULES.index("other_choice")
    rule[stop_w] = RULES.index("stop_word")
    bet[is2 | stop_w] = 0
    for prefix, mask in (("choice_1", is1 & ~blank), ("bet_word", bet_w & ~blank)):
        rule[mask & safe] = RULES.index(f"{prefix}_fixed")
        rule[mask & ~safe] = RULES.index(f"{prefix}_no_amount")
    bet[betting & safe] = FIXED_BET

    # amounts for risky bets: first segment with an amount wins
    need = betting & ~safe
    if need.any():
        first = pc.if_else(pa.array(is1), rest, l1)
        echo2 = np_bool(pc.match_substring_regex(l2, ECHO_RE))
        echo3 = np_bool(pc.match_substring_regex(l3, ECHO_RE))
        use2 = ~echo2
        use3 = ~echo2 & ~echo3
        found = np.zeros(n, dtype=bool)
        amount = np.full(n, -1, dtype=np.int64)
        for seg, allowed in ((first, np.ones(n, dtype=bool)), (l2, use2), (l3, use3)):
            todo = need & allowed & ~found
            if not todo.any():
                continue
            cut = pc.replace_substring_regex(seg, CUT_RE, "", max_replacements=1)
            m = pc.extract_regex(cut, AMOUNT_RE)
            ok = np_bool(pc.is_valid(m)) & todo
            if not ok.any():
                continue
            a = pc.fill_null(pc.struct_field(m, "a"), "")
            b = pc.fill_null(pc.struct_field(m, "b"), "")
            c = pc.fill_null(pc.struct_field(m, "c"), "")
            digits = pc.if_else(pc.not_equal(a, ""), a, pc.if_else(pc.not_equal(b, ""), b, c))
            digits = pc.if_else(pc.equal(digits, ""), "-1", digits)
            vals = pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False)
            amount[ok] = vals[ok]
            found |= ok
        in_range = found & (amount >= min_bet) & (amount <= max_bet)
        for prefix, mask in (("choice_1", is1), ("bet_word", bet_w)):
            sel = need & mask
            rule[sel & in_range] = RULES.index(f"{prefix}_amount")
            rule[sel & found & ~in_range] = RULES.index(f"{prefix}_bad_amount")
        bet[need & in_range] = amount[need & in_range].astype(np.int32)

    rule[blank] = RULES.index("empty")
    bet[blank] = -1
    action = np.full(n, ACTION_INVALID, dtype=np.int8)
    action[(is2 | stop_w) & ~blank] = ACTION_STOP
    action[betting] = ACTION_BET
    valid = action != ACTION_INVALID
    return action, bet, valid, rule
