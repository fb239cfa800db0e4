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
# the three tests on the first line in one pass, in the reference's order (choice, stop, bet)
FIRST_RE = (r"(?i)^[ \t]*(?:(?:choice[ \t]*:?[ \t]*)?\(?(?P<num>[0-9]+)(?P<rest>[^0-9][^\n]*|)$"
            r"|(?:i[ \t]*(?:will|'ll|want to|choose to|decide to|would like to)[ \t]+)?"
            r"(?:(?P<stop>stop|quit|walk away|cash out|fold|pass|end the game)|(?P<bet>bet|wager)))")
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


def _amounts(texts):
    """(found, amount) per text (a pyarrow string array; the answer's segments joined by
    newlines): the first amount after cutting each line from balance/result/... on. No amount
    pattern crosses a newline, so the leftmost match is the first segment's that has one
    (as the reference's loop over segments)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    mt = pc.extract_regex(pc.replace_substring_regex(texts, CUT_RE, ""), AMOUNT_RE)
    found = np.asarray(pc.is_valid(mt).to_numpy(zero_copy_only=False), dtype=bool)
    a = pc.fill_null(pc.struct_field(mt, "a"), "")
    b = pc.fill_null(pc.struct_field(mt, "b"), "")
    c = pc.fill_null(pc.struct_field(mt, "c"), "")
    digits = pc.if_else(pc.not_equal(a, ""), a, pc.if_else(pc.not_equal(b, ""), b, c))
    digits = pc.if_else(pc.equal(digits, ""), "-1", digits)
    return found, pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False)


def _distinct(strings):
    """(values to run a rule on, numpy index from each row into them). A rule is a function
    of one string, so when the strings repeat (answers do: "1", "2", "1) Bet $10", ...) it runs
    once per distinct value and is spread back by the dictionary codes; when most are
    distinct, on the rows themselves (coding them would only add work)."""
    import numpy as np
    import pyarrow.compute as pc

    d = pc.dictionary_encode(strings)
    if 2 * len(d.dictionary) > len(strings):
        return strings, np.arange(len(strings))
    return d.dictionary, np.asarray(d.indices.to_numpy(zero_copy_only=False), dtype=np.int64)


def parse_decisions(responses, prompt_is_safe, min_bet: int = 5, max_bet: int = 100):
    """Vectorised parser over a pyarrow string array.

    `prompt_is_safe` is a numpy bool array. Returns numpy arrays (action code int8, bet
    int32 with -1 for none, valid bool, rule code int8 indexing RULES). Each regular
    expression runs only on the rows that still need it (the first lines, the risky bets'
    next lines and answers), and once per distinct value where values repeat."""
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

    def nonempty(a) -> "np.ndarray":
        return np_bool(pc.not_equal(pc.fill_null(a, ""), ""))

    # the first three lines after the leading whitespace (as LINES_RE); a blank reply is an
    # empty first line
    trimmed = pc.utf8_ltrim(resp, characters=" \t\r\n\f\v")
    lines = pc.split_pattern(trimmed, "\n", max_splits=3)
    u1, i1 = _distinct(pc.list_element(lines, 0))
    # per (distinct) first line: the three tests in one pass, in the reference's order
    first_line = pc.extract_regex(u1, FIRST_RE)
    num = pc.fill_null(pc.struct_field(first_line, "num"), "").to_numpy(zero_copy_only=False)
    blank_u = np_bool(pc.equal(u1, ""))
    has_choice_u = num != ""
    is2_u = has_choice_u & (num == "2")
    is1_u = has_choice_u & (num == "1")
    stop_u = ~has_choice_u & ~blank_u & nonempty(pc.struct_field(first_line, "stop"))
    bet_u = ~has_choice_u & ~blank_u & ~stop_u & nonempty(pc.struct_field(first_line, "bet"))

    blank, is1, is2, stop_w, bet_w = blank_u[i1], is1_u[i1], is2_u[i1], stop_u[i1], bet_u[i1]
    other = has_choice_u[i1] & ~is1 & ~is2
    betting = (is1 | bet_w) & ~blank

    rule[is2] = RULES.index("choice_2")
    rule[other] = RULES.index("other_choice")
    rule[stop_w] = RULES.index("stop_word")
    bet[is2 | stop_w] = 0
    for prefix, mask in (("choice_1", is1 & ~blank), ("bet_word", bet_w & ~blank)):
        rule[mask & safe] = RULES.index(f"{prefix}_fixed")
        rule[mask & ~safe] = RULES.index(f"{prefix}_no_amount")
    bet[betting & safe] = FIXED_BET

    # amounts for risky bets: the first segment with an amount wins
    need = betting & ~safe
    if need.any():
        nidx = np.flatnonzero(need)
        # segment 1: the rest of a "1 ..." answer line, else the whole line (a bet word)
        rest = pc.fill_null(pc.struct_field(first_line, "rest"), "")
        first = pc.if_else(pa.array(is1_u), rest, u1).take(pa.array(i1[nidx]))
        # segments 2 and 3: the next lines (empty when missing), up to the first echoed one
        s23 = pc.fill_null(pc.list_flatten(pc.list_slice(lines.take(pa.array(nidx)), 1, 3,
                                                         return_fixed_size_list=True)), "")
        u23, i23 = _distinct(s23)
        echo = np_bool(pc.match_substring_regex(u23, ECHO_RE))[i23]
        s2, s3 = s23.take(pa.array(np.arange(0, len(s23), 2))), s23.take(pa.array(np.arange(1, len(s23), 2)))
        use2 = pa.array(~echo[0::2])
        use3 = pa.array(~echo[0::2] & ~echo[1::2])
        region = pc.if_else(use2, pc.binary_join_element_wise(first, s2, "\n"), first)
        region = pc.if_else(use3, pc.binary_join_element_wise(region, s3, "\n"), region)
        ur, ir = _distinct(region)
        found_u, amount_u = _amounts(ur)
        found, amount = found_u[ir], amount_u[ir]
        in_range = found & (amount >= min_bet) & (amount <= max_bet)
        full_found = np.zeros(n, bool)
        full_found[nidx] = found
        full_in = np.zeros(n, bool)
        full_in[nidx] = in_range
        for prefix, mask in (("choice_1", is1), ("bet_word", bet_w)):
            sel = need & mask
            rule[sel & full_in] = RULES.index(f"{prefix}_amount")
            rule[sel & full_found & ~full_in] = RULES.index(f"{prefix}_bad_amount")
        bet[nidx[in_range]] = amount[in_range].astype(np.int32)

    rule[blank] = RULES.index("empty")
    bet[blank] = -1
    action = np.full(n, ACTION_INVALID, dtype=np.int8)
    action[(is2 | stop_w) & ~blank] = ACTION_STOP
    action[betting] = ACTION_BET
    valid = action != ACTION_INVALID
    return action, bet, valid, rule
