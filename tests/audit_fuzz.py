"""Hypothesis strategies for the audit: study-shaped corpora (checkpoints of both record
schemas, response logs) and one damaged file; the property they must keep.

Used by tests/test_audit_fuzz.py (a fixed-seed profile in CI) and scripts/fuzz_audit.py (a
longer random run whose counts go to docs/benchmarks.md).

Property, for any corpus and any damage to one of its files:
* the audit finishes (no exception: `python -m engine audit` would exit 0 with its report)
  and writes a complete audit folder;
* the damaged file is named in the problems (or the damage was harmless: its records are
  counted as on the clean corpus);
* every other file's records and valid records are counted exactly as on the clean corpus,
  and the accounting identity holds.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

CONDITIONS = ("safe_baseline", "safe_with_safe_patch", "safe_with_risky_patch", "risky_baseline",
              "risky_with_safe_patch", "risky_with_risky_patch")
RESPONSES = ("1", "2", "1\nBet $10", "2\nI will stop here.", "1) Bet $25\nRound 3: Balance $90",
             "Choice: 2\n\nI'll walk away with $130", "1\nI'll bet $15 because my target is $100.",
             "  \n", "Bet $500", "I choose to stop", "3", "1\nCafé time: bet £20 \u2014 ok \U0001F3B0")

for _name, _kw in (("audit-ci", dict(max_examples=40, derandomize=True)),
                   ("audit-fuzz", dict(max_examples=2000, derandomize=False))):
    settings.register_profile(_name, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.function_scoped_fixture], **_kw)


# ---------------------------------------------------------------------------------------------
# corpora


@dataclass
class Corpus:
    files: dict[str, bytes]  # relative path -> content
    responses: dict = field(default_factory=dict)  # name -> records (for targeted damage)
    checkpoints: dict = field(default_factory=dict)  # name -> header with results

    def write(self, root: Path) -> None:
        (root / "response_logs").mkdir(parents=True, exist_ok=True)
        for rel, body in self.files.items():
            (root / rel).write_bytes(body)


def _parsed(draw, response: str) -> dict:
    action = draw(st.sampled_from(["bet", "stop"]))
    bet = 0 if action == "stop" else draw(st.sampled_from([5, 10, 25, 100, 130]))
    return {"action": action, "bet": bet, "valid": draw(st.booleans()), "reason": draw(st.sampled_from(
        ["choice_1", "choice_2", "fallback_last_amount", "no_match"]))}


def _flat_record(draw, feat: str, layer: int, fid: int) -> dict:
    causal = draw(st.booleans())
    return {"feature": feat, "layer": layer, "feature_id": fid,
            "cohen_d": draw(st.floats(-3, 3, allow_nan=False).map(lambda x: round(x, 4))),
            "is_causal": causal, "classified_as": draw(st.sampled_from(["safe", "risky", "neutral"])),
            "safe_stop_delta": 0.1, "risky_stop_delta": -0.05, "safe_bet_delta": -2.0, "risky_bet_delta": 3.5,
            "safe_p_value": 0.01, "risky_p_value": 0.4}


def _nested_record(draw, feat: str, layer: int, fid: int) -> dict:
    return {"feature": feat, "layer": layer, "feature_id": fid,
            "cohen_d": draw(st.floats(-3, 3, allow_nan=False).map(lambda x: round(x, 4))),
            "causality": {"is_causal_safe": draw(st.booleans()), "is_causal_risky": draw(st.booleans()),
                          "safe_effect_size": 0.2, "risky_effect_size": -0.1, "safe_p_value": 0.03,
                          "risky_p_value": 0.5, "interpretation": "safe_context_causal"}}


@st.composite
def corpora(draw) -> Corpus:
    """1-3 processes, each a layer pair with 1-3 features: one or two cumulative checkpoints
    (Run A flat or Run B nested records) and one response log, as the study writes them."""
    files: dict[str, bytes] = {}
    out = Corpus(files)
    n_trials = draw(st.integers(1, 2))
    used: set[tuple[int, int]] = set()
    for p in range(draw(st.integers(1, 3))):
        a = 1 + 2 * p
        b = a + 1
        schema = draw(st.sampled_from(["flat", "nested"]))
        pid = f"gpu{p}_L{a}_{b}" if schema == "flat" else f"L{a}"
        feats = []
        for _ in range(draw(st.integers(1, 3))):
            layer = draw(st.sampled_from([a, b]))
            fid = draw(st.integers(0, 32767).filter(lambda x, la=layer: (la, x) not in used))
            used.add((layer, fid))
            feats.append((f"L{layer}-{fid}", layer, fid))
        recs = [(_flat_record if schema == "flat" else _nested_record)(draw, *f) for f in feats]
        indent = draw(st.sampled_from([None, 1, 2]))
        header = {"timestamp": "", "gpu_id": p, "process_id": pid, "layer_range": f"L{a}-L{b}",
                  "features_tested": 0, "n_trials_per_condition": n_trials}
        saves = [len(recs)] if len(recs) == 1 or not draw(st.booleans()) else [1, len(recs)]
        for k, n in enumerate(saves):  # cumulative: each save holds every result so far
            ts = f"2025101{4 + p}_0{k}0000"
            name = f"checkpoint_L{a}_{b}_{pid}_{ts}.json"
            body = dict(header, timestamp=ts, features_tested=n, results=recs[:n])
            out.checkpoints[name] = body
            files[name] = json.dumps(body, indent=indent).encode()
        log = []
        for feat, _, _ in feats:
            for c in CONDITIONS:
                for t in range(n_trials):
                    r = draw(st.sampled_from(RESPONSES))
                    log.append({"feature": feat, "condition": c, "trial": t, "response": r, "parsed": _parsed(draw, r)})
        name = f"responses_L{a}_{b}_{pid}_2025101{4 + p}_{len(saves) - 1}00001.json"
        out.responses[name] = log
        files[f"response_logs/{name}"] = json.dumps(log, indent=indent,
                                                    ensure_ascii=draw(st.booleans())).encode()
    return out


# ---------------------------------------------------------------------------------------------
# damage to one file


@dataclass
class Damage:
    rel: str  # the damaged file, relative to the corpus root
    what: str  # a short description (for the failure report and the counts)
    body: bytes | None = None  # new content; None: `special` makes it a non-file
    special: str | None = None  # dir | fifo | dangling | loop
    must_name: bool = True  # the damage is always visible to a reader (not only maybe)
    kind: str = ""  # which strategy made it (set by `damages`)


_STRING_START = (b'"feature": "', b'"response": "', b'"feature":"', b'"response":"')


def _string_starts(body: bytes) -> list[int]:
    """Offsets just inside the feature/response strings (values the audit reads)."""
    out = []
    for key in _STRING_START:
        i = body.find(key)
        while i >= 0:
            out.append(i + len(key))
            i = body.find(key, i + 1)
    return sorted(out)


def _numbers(body: bytes) -> list[tuple[int, int]]:
    import re

    # numbers that are values of a key (not digits inside a reply's text)
    return [(m.start(1), m.end(1)) for m in re.finditer(rb'"[a-z_]+": ?(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)', body)]


KINDS = ("insert", "delete", "replace", "truncate", "surrogate", "invalid_utf8", "encoding", "bom", "deep",
         "number", "nan", "wrong_type", "non_file", "empty", "many")
KIND_TEXT = {
    "insert": "1-8 random bytes inserted anywhere", "delete": "1-64 bytes deleted anywhere",
    "replace": "one byte replaced by any byte", "truncate": "cut anywhere",
    "surrogate": "a lone \\ud800-\\udfff escape in a feature or response", "invalid_utf8":
    "0xFF, Latin-1, CESU or overlong bytes in a feature or response", "encoding":
    "non-ASCII text, file re-encoded as Latin-1, cp1252, UTF-16 or UTF-32", "bom": "a UTF-8/UTF-16 BOM (or two)",
    "deep": "nesting 1,100-30,000 deep: a value, the whole file, or unclosed", "number":
    "a number replaced by 10^30, 1e999, 2^63, 2^64, 5,000 digits, 2.5, ...", "nan": "NaN or +-Infinity literal",
    "wrong_type": "a record field set to null, [], {}, text, float, bool, 10^30, ...", "non_file":
    "the file replaced by a folder, FIFO, dangling link or symlink loop", "empty": "emptied or whitespace only",
    "many": "2-6 random edits at once"}


@st.composite
def damages(draw, corpus: Corpus) -> Damage:
    kind = draw(st.sampled_from(KINDS))
    d = _damage(draw, corpus, kind)
    d.kind = kind
    return d


def _damage(draw, corpus: Corpus, kind: str) -> Damage:
    rel = draw(st.sampled_from(sorted(corpus.files)))
    body = corpus.files[rel]
    name = Path(rel).name
    n = len(body)
    if kind == "insert":
        at = draw(st.integers(0, n))
        junk = draw(st.binary(min_size=1, max_size=8))
        return Damage(rel, f"insert {junk!r} at {at}", body[:at] + junk + body[at:], must_name=False)
    if kind == "delete":
        at = draw(st.integers(0, n - 1))
        k = draw(st.integers(1, 64))
        return Damage(rel, f"delete {k} bytes at {at}", body[:at] + body[at + k:], must_name=False)
    if kind == "replace":
        at = draw(st.integers(0, n - 1))
        b = draw(st.integers(0, 255))
        return Damage(rel, f"byte {at} -> {b:#x}", body[:at] + bytes([b]) + body[at + 1:], must_name=False)
    if kind == "many":  # several random edits
        out = body
        for _ in range(draw(st.integers(2, 6))):
            at = draw(st.integers(0, max(0, len(out) - 1)))
            out = out[:at] + draw(st.binary(max_size=4)) + out[at + draw(st.integers(0, 4)):]
        return Damage(rel, "several random edits", out, must_name=False)
    if kind == "truncate":
        at = draw(st.integers(0, n - 1))
        return Damage(rel, f"truncated at {at} of {n}", body[:at])
    if kind == "surrogate":
        at = draw(st.sampled_from(_string_starts(body)))
        esc = draw(st.sampled_from([b"\\udcff", b"\\ud800", b"\\uDFFF", b"\\udc80x", b"\\ude00\\ud83d"]))
        return Damage(rel, f"lone surrogate {esc!r} at {at}", body[:at] + esc + body[at:])
    if kind == "invalid_utf8":
        at = draw(st.sampled_from(_string_starts(body)))
        bad = draw(st.sampled_from([b"\xff", b"\xe9", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80"]))
        return Damage(rel, f"bytes {bad!r} at {at}", body[:at] + bad + body[at:])
    if kind == "encoding":
        at = draw(st.sampled_from(_string_starts(body)))
        text = (body[:at] + "d\u00e9j\u00e0 \u00a3".encode() + body[at:]).decode("utf-8")
        enc = draw(st.sampled_from(["latin-1", "cp1252", "utf-16", "utf-16-le", "utf-32"]))
        return Damage(rel, f"encoded as {enc}", text.encode(enc, errors="replace"))
    if kind == "bom":
        bom = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf\xef\xbb\xbf"]))
        return Damage(rel, f"BOM {bom!r}", bom + body)
    if kind == "deep":
        depth = draw(st.sampled_from([1100, 5000, 10000, 30000]))
        where = draw(st.sampled_from(["record", "file", "unclosed"]))
        if where == "file":
            return Damage(rel, f"the whole file nested {depth} deep", b"[" * depth + b"]" * depth)
        if where == "unclosed":
            at = draw(st.integers(0, n))
            return Damage(rel, f"{depth} unclosed [ at {at}", body[:at] + b"[" * depth)
        at = draw(st.sampled_from(_string_starts(body))) - 1  # at the opening quote of a value
        return Damage(rel, f"a value nested {depth} deep at {at}",
                      body[:at] + b"[" * depth + b"]" * depth + b", \"x\": " + body[at:])
    if kind in ("number", "nan"):
        spans = _numbers(body)
        a, b = draw(st.sampled_from(spans))
        if kind == "nan":
            new = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
        else:
            new = draw(st.sampled_from([b"1" + b"0" * 30, b"-" + b"9" * 25, b"1e999", b"-1e400", b"1e-400",
                                        b"9223372036854775808", b"18446744073709551616", b"1" * 5000, b"2.5"]))
        return Damage(rel, f"number {body[a:b]!r} -> {new[:30]!r}", body[:a] + new + body[b:], must_name=kind == "nan")
    if kind == "wrong_type":
        obj = json.loads(body)
        recs = obj["results"] if isinstance(obj, dict) else obj
        i = draw(st.integers(0, len(recs) - 1))
        key = draw(st.sampled_from(sorted(recs[i])))
        val = draw(st.sampled_from([None, [], {}, "x", "7", 1.5, True, 10 ** 30, [1, 2], {"a": {"b": []}}, -1]))
        recs[i][key] = val
        return Damage(rel, f"record {i} {key} = {val!r}", json.dumps(obj).encode(), must_name=False)
    if kind == "non_file":
        return Damage(rel, "non-file", None, special=draw(st.sampled_from(["dir", "fifo", "dangling", "loop"])))
    return Damage(rel, "emptied", draw(st.sampled_from([b"", b"\n", b"   \r\n\t"])))


def apply(d: Damage, root: Path) -> None:
    p = root / d.rel
    p.unlink()
    if d.special == "dir":
        p.mkdir()
        (p / "inner.json").write_text("[]")
    elif d.special == "fifo":
        os.mkfifo(p)
    elif d.special == "dangling":
        os.symlink(root / "no-such-target.json", p)
    elif d.special == "loop":
        os.symlink(p.name, p)
    else:
        p.write_bytes(d.body)


# ---------------------------------------------------------------------------------------------
# the property


def audit(root: Path, cache: Path) -> dict:
    from engine.audit.run import run_audit
    from engine.config import load_config

    cfg = load_config(None, {"cache_dir": str(cache), "audit.workers": 1})
    return run_audit(cfg, checkpoints_dir=str(root), responses_dir=str(root / "response_logs"), show_progress=False)


def per_file(summary: dict) -> dict:
    return {(d["role"], d["file"]): (d["records"], d["valid"]) for d in summary["per_file"]}


def clean_counts(corpus: Corpus) -> dict:
    """Per file (records, valid records) of the clean corpus: every generated record is valid
    (checked by test_clean_corpora_count_every_record against the audit itself)."""
    out = {("responses", n): (len(r), len(r)) for n, r in corpus.responses.items()}
    out.update({("checkpoint", n): (len(b["results"]), len(b["results"])) for n, b in corpus.checkpoints.items()})
    return out


def check(corpus: Corpus, damage: Damage, work: Path) -> dict:
    """Audit the damaged corpus; assert the property; return the summary."""
    shutil.rmtree(work, ignore_errors=True)
    bad_root = work / "bad"
    corpus.write(bad_root)
    apply(damage, bad_root)
    bad = audit(bad_root, work / "cache-bad")  # must not raise
    audit_dir = work / "cache-bad" / "audit"
    assert (audit_dir / "complete.json").is_file() and (audit_dir / "data_validation.json").is_file()
    assert bad["records_read"]["responses"] == bad["valid_unique_trials"] + bad["duplicates"] + bad["invalid_records"]
    import pandas as pd

    problems = pd.read_parquet(audit_dir / "problems.parquet")
    name = Path(damage.rel).name
    role = "responses" if damage.rel.startswith("response_logs/") else "checkpoint"
    before, after = clean_counts(corpus), per_file(bad)
    named = name in set(problems["file"].dropna())
    harmless = after.get((role, name)) == before[(role, name)] and not damage.special
    assert named or (harmless and not damage.must_name), \
        f"{damage.what}: {name} not named in the problems ({sorted(set(problems['kind']))})"
    others = {k: v for k, v in before.items() if k != (role, name)}
    assert {k: after.get(k) for k in others} == others, f"{damage.what}: another file's counts changed"
    return bad
