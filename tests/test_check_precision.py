"""scripts/check_precision.py's comparison, on hand-made node lists."""

from __future__ import annotations

import pytest

from scripts.check_precision import compare


def nodes(**attr):
    return [{"id": k, "attribution": v} for k, v in attr.items()]


def test_compare_counts_orders_sets_jaccard_and_errors():
    ref = {"L3-1": {"safe": nodes(a=5.0, b=-4.0, c=3.0, d=2.0, e=1.0, f=0.5),
                    "risky": nodes(a=1.0, b=2.0)}}
    got = {"L3-1": {"safe": nodes(a=5.0, b=-4.4, c=1.9, d=2.0, e=1.0, g=0.4),  # c and d swap places
                    "risky": nodes(a=1.0, b=2.0)}}
    r = compare(ref, got)
    assert r["pairs"] == 2
    assert r["top5_same_order"] == 1 and r["top5_same_set"] == 2
    assert r["mean_jaccard"] == pytest.approx((5 / 7 + 1.0) / 2)
    # errors of the reference's five strongest: safe a 0, b 0.1, c 0.3667, d 0, e 0; risky 0, 0
    assert r["max_rel_err_top5"] == pytest.approx(1.1 / 3)
    assert r["median_rel_err_top5"] == 0.0
