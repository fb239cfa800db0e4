"""Property-based: the audit on generated study-shaped corpora with one damaged file
(tests/audit_fuzz.py has the strategies and the property). A fixed-seed profile here;
scripts/fuzz_audit.py runs the long random one."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

import audit_fuzz as AF

_n = itertools.count()


@settings(settings.get_profile("ci"), max_examples=6)
@given(AF.corpora())
def test_clean_corpora_count_every_record(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("clean")
    corpus.write(root)
    s = AF.audit(root, root / "cache")
    assert AF.per_file(s) == AF.clean_counts(corpus)
    assert s["invalid_records"] == 0 and s["problem_counts_by_severity"].get("error", 0) == 0
    assert s["valid_unique_trials"] == sum(len(r) for r in corpus.responses.values())


@settings(settings.get_profile("ci"))
@given(st.data())
def test_one_damaged_file_is_that_files_problem(tmp_path_factory, data):
    corpus = data.draw(AF.corpora(), label="corpus")
    damage = data.draw(AF.damages(corpus), label="damage")
    AF.check(corpus, damage, tmp_path_factory.getbasetemp() / f"fuzz-{next(_n)}")
