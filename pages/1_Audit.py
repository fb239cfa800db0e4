"""Audit: what step 0 found in the study's checkpoints and response logs."""

import pandas as pd
import streamlit as st

from explorer import data, figures, views
from explorer.widgets import fmt, load, metric_row, page_setup

ctx = page_setup("Audit", ":material/fact_check:")
st.title("Data audit")
st.caption("Step 0 reads every checkpoint file and response log of the study, checks each record, "
           "removes restart duplicates and re-parses every response.")

v = load(data.audit_validation, ctx)
if stale := data.stale_note(ctx, "audit"):
    st.warning(f"The audit may be out of date: {stale.note}.", icon=":material/history:")
h = views.audit_headline(v)
ok = h["validated"]
metric_row([
    ("Files read", fmt(h["files"]), "Checkpoint files and response logs opened"),
    ("Records read", fmt(h["records"]), "Records in those files, before any check"),
    ("Valid unique trials", fmt(h["valid_trials"]), "Trials that passed every check, after removing duplicates"),
    ("Duplicates", fmt(h["duplicates"]), "Repeated (feature, condition, trial) records from restarted runs; "
                                          "the newest copy is kept"),
    ("Join rate", f"{fmt(h['join_rate'], 1)}%" if h["join_rate"] is not None else "–",
     "Share of causal features that have response logs to recompute their effects from"),
    ("Verdict", "passed" if ok else ("failed" if ok is False else "–"),
     f"{fmt(h['errors'])} errors, {fmt(h['warnings'])} warnings"),
])

# --- problems ------------------------------------------------------------------
st.subheader("Problems")
problems = load(data.audit_problems, ctx, stop=False)
counts = v.get("problem_counts") if isinstance(v.get("problem_counts"), dict) else None
if problems is not None and len(problems):
    by_kind = problems.groupby(["kind", "severity"]).size().rename("records").reset_index()
    by_kind = by_kind.sort_values("records", ascending=False)
elif counts:
    by_kind = pd.DataFrame({"kind": list(counts), "records": list(counts.values())})
else:
    by_kind = pd.DataFrame()
if not len(by_kind):
    st.success("No problems found.", icon=":material/task_alt:")
else:
    c1, c2 = st.columns([1, 2.2], gap="medium")
    c1.dataframe(by_kind, hide_index=True, width="stretch",
                 column_config={"records": st.column_config.NumberColumn(help="Records with this problem")})
    with c2:
        if problems is None or not len(problems):
            st.info("The detailed problem table (audit/problems.parquet) is not in the cache.", icon=":material/info:")
        else:
            f1, f2, f3 = st.columns([1.4, 1, 1.6])
            kinds = f1.multiselect("Kind", sorted(problems["kind"].astype(str).unique()), placeholder="all kinds")
            sev = f2.multiselect("Severity", sorted(problems["severity"].astype(str).unique()), placeholder="all")
            text = f3.text_input("Search", placeholder="file, field or message")
            shown = problems
            if kinds:
                shown = shown[shown["kind"].astype(str).isin(kinds)]
            if sev:
                shown = shown[shown["severity"].astype(str).isin(sev)]
            if text.strip():
                t = text.strip().lower()
                hay = (shown["file"].astype(str) + " " + shown.get("field", "").astype(str) + " "
                       + shown["message"].astype(str)).str.lower()
                shown = shown[hay.str.contains(t, regex=False)]
            st.dataframe(shown.head(5000), hide_index=True, width="stretch", height=300,
                         column_config={"record": st.column_config.NumberColumn(help="Index of the record in its file")})
            st.caption(f"{len(shown):,} of {len(problems):,} problems" + (" (first 5,000 shown)" if len(shown) > 5000 else ""))

# --- coverage and trial counts --------------------------------------------------
st.subheader("Trials")
fc = load(data.audit_feature_conditions, ctx, stop=False)
expected = views.expected_trials(fc, h)
if fc is None or not len(fc):
    st.info("No per feature x condition table (audit/feature_conditions.parquet) in the cache.", icon=":material/info:")
else:
    cov = views.coverage_matrix(fc, expected, list(ctx.cfg.data.conditions))
    c1, c2 = st.columns(2, gap="medium")
    c1.plotly_chart(figures.coverage_heatmap(cov), key="audit_cov", config={"displaylogo": False})
    c2.plotly_chart(figures.trial_histogram(fc["n_trials"], expected), key="audit_hist", config={"displaylogo": False})
    short = int((fc["n_trials"] < expected).sum()) if expected else 0
    st.caption(f"{len(fc):,} feature × condition pairs; {short:,} have fewer than the expected {fmt(expected)} trials.")

# --- parsing ------------------------------------------------------------------------
st.subheader("Response parsing")
ps = load(views.audit_trial_summary, ctx, v, stop=False)
if not ps:
    st.info("No parse comparison in the audit output.", icon=":material/info:")
else:
    n = ps["compared"]
    c1, c2 = st.columns([1.3, 1], gap="medium")
    rows = [(lbl, ps[k], n) for lbl, k in (("study's parser", "study_valid"), ("our parser", "our_valid")) if ps.get(k) is not None]
    if rows:
        c1.plotly_chart(figures.parse_bars(rows), key="audit_parse", config={"displaylogo": False})
    with c2:
        metric_row([
            ("Study's parser valid", fmt(ps.get("study_valid", 0) / n if ps.get("study_valid") is not None else None, pct=True),
             "Share of trials the study's own parser marked valid"),
            ("Our parser valid", fmt(ps.get("our_valid", 0) / n if ps.get("our_valid") is not None else None, pct=True),
             "Share of trials our re-parse reads as a valid bet or stop"),
        ])
        metric_row([
            ("Disagreement", fmt(ps["disagree"] / n if ps.get("disagree") is not None else None, pct=True),
             "Share of trials where the two parsers read a different decision"),
            ("Trials compared", fmt(n), "Trials with both parses"),
        ])

# --- runs ---------------------------------------------------------------------------
runs = v.get("runs_found")
if runs:
    st.subheader("Runs found")
    st.caption("The study ran Experiment 2 more than once with the same file names; the audit separates the runs "
               "by timestamp.")
    st.dataframe(pd.DataFrame(runs) if isinstance(runs, list) else pd.DataFrame([runs]), hide_index=True, width="stretch")
conds = v.get("conditions_found")
if conds:
    st.caption("Conditions found: " + ", ".join(f"`{c}`" for c in (conds if isinstance(conds, list) else list(conds))))
