"""Audit: what step 0 found in the study's checkpoints and response logs."""

import pandas as pd
import streamlit as st

from explorer import data, figures, views
from explorer.widgets import fmt, load, metric_row, page_setup, stale_banner

ctx = page_setup("Audit", ":material/fact_check:")
st.title("Data audit")
st.caption("Step 0 reads every checkpoint file and response log of the study, checks each record, "
           "removes restart duplicates (newest copy wins) and re-parses every response.")

v = load(data.audit_validation, ctx)
stale_banner(ctx, "audit", "The audit")
if v.get("mode") == "validate-only":
    st.info("This audit ran with --validate-only: the tables below may come from an earlier full run.",
            icon=":material/info:")
h = views.audit_headline(v)
metric_row([
    ("Files read", fmt(h["files"]), f"Checkpoint files and response logs opened ({h['files_detail'] or 'no breakdown'})"),
    ("Records read", fmt(h["records"]), f"Records in those files, before any check ({h['records_detail'] or 'no breakdown'})"),
    ("Valid unique trials", fmt(h["valid_trials"]), "Response records that passed every check, after removing duplicates"),
    ("Duplicates", fmt(h["duplicates"]), "Repeated (feature, condition, trial) records from restarted runs; the "
                                         "newest copy is kept"),
    ("Invalid records", fmt(h["invalid_records"]), "Response records dropped because a required field was missing "
                                                   "or unreadable"),
    ("Join rate", f"{fmt(h['join_rate'], 1)}%" if h["join_rate"] is not None else "–",
     "Share of the checkpoints' causal features that have response logs to recompute their effects from"),
])
ok = h["validated"]
metric_row([
    ("Audit", "passed" if ok else ("failed" if ok is False else "–"),
     f"Passed when no problem of severity 'error' was found: {fmt(h['errors'])} errors, {fmt(h['warnings'])} warnings"),
    ("Causal (checkpoints)", fmt(h["causal"]), "Features the study's checkpoints mark causal"),
    ("Causal (recomputed)", fmt(h["recomputed_causal"]),
     "Features our own test on the response logs finds causal (docs: audit statistics)"),
    ("Verdicts agree", f"{fmt(h['verdicts_agree'])} / {fmt(h['verdicts_compared'])}" if h["verdicts_compared"] else "–",
     "Features where the checkpoint's verdict and ours agree, of those with both"),
])

# --- problems ------------------------------------------------------------------
st.subheader("Problems")
problems = load(data.audit_problems, ctx, stop=False)
counts = v.get("problem_counts") if isinstance(v.get("problem_counts"), dict) else None
kinds_meaning = {k: (m or {}).get("meaning", "") for k, m in (v.get("problem_kinds") or {}).items()}
if problems is not None and len(problems):
    by_kind = problems.groupby(["kind", "severity"], observed=True).size().rename("records").reset_index()
    by_kind = by_kind.sort_values("records", ascending=False)
elif counts:
    by_kind = pd.DataFrame({"kind": list(counts), "records": list(counts.values())})
else:
    by_kind = pd.DataFrame()
if not len(by_kind):
    st.success("No problems found.", icon=":material/task_alt:")
else:
    if kinds_meaning:
        by_kind["meaning"] = by_kind["kind"].map(kinds_meaning).fillna("")
    c1, c2 = st.columns([1.15, 2], gap="medium")
    c1.dataframe(by_kind, hide_index=True, width="stretch", height=min(420, 38 + 35 * len(by_kind)),
                 column_config={"records": st.column_config.NumberColumn(help="Problems of this kind"),
                                "meaning": st.column_config.TextColumn(width="medium")})
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
                hay = shown["file"].astype(str) + " " + shown["message"].astype(str)
                if "field" in shown.columns:
                    hay = hay + " " + shown["field"].astype(str)
                shown = shown[hay.str.lower().str.contains(t, regex=False)]
            cols = [c for c in ("kind", "severity", "file", "record", "field", "message", "value") if c in shown.columns]
            st.dataframe(shown[cols].head(5000), hide_index=True, width="stretch", height=320,
                         column_config={"record": st.column_config.NumberColumn(help="Index of the record in its file"),
                                        "field": st.column_config.TextColumn(help="The record's field at fault")})
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
found = v.get("conditions_found")
if isinstance(found, dict) and found:
    expected_conds = set(v.get("conditions_expected") or ctx.cfg.data.conditions)
    st.caption("Conditions found: " + ", ".join(
        f"`{c}` {n:,}" + ("" if c in expected_conds else " (not a configured condition)") for c, n in found.items()))

# --- parsing ------------------------------------------------------------------------
st.subheader("Response parsing")
ps = load(views.audit_trial_summary, ctx, v, stop=False)
if not ps:
    st.info("No parse comparison in the audit output.", icon=":material/info:")
else:
    n = ps["compared"]
    c1, c2 = st.columns([1.2, 1], gap="medium")
    rows = [(lbl, ps[k], n) for lbl, k in (("study's parser", "study_valid"), ("our parser", "our_valid"))
            if ps.get(k) is not None]
    if rows:
        c1.plotly_chart(figures.parse_bars(rows), key="audit_parse", config={"displaylogo": False})
    both = ps.get("both_valid")
    with c2:
        metric_row([
            ("Study's parser valid", fmt(ps["study_valid"] / n if ps.get("study_valid") is not None else None, pct=True),
             "Share of trials the study's own parser marked valid"),
            ("Our parser valid", fmt(ps["our_valid"] / n if ps.get("our_valid") is not None else None, pct=True),
             "Share of trials our re-parse reads as a valid bet or stop"),
        ])
        metric_row([
            ("Bet/stop disagree", fmt(ps["disagree"] / both if both and ps.get("disagree") is not None else None, pct=True),
             "Share of trials valid under both parsers where they read a different decision"),
            ("Both valid", fmt(both), "Trials both parsers read as valid"),
        ])
        if ps.get("study_stop_ours_bet") is not None:
            st.caption(f"The study read **stop** where we read bet: {fmt(ps['study_stop_ours_bet'])}; "
                       f"**bet** where we read stop: {fmt(ps['study_bet_ours_stop'])}"
                       + (f"; same decision but another bet amount: {fmt(ps['bet_amount_disagree'])}"
                          if ps.get("bet_amount_disagree") is not None else "") + ".")

# --- runs ---------------------------------------------------------------------------
runs = v.get("runs_found")
if runs:
    st.subheader("Runs found")
    st.caption("The study ran Experiment 2 more than once with the same file names; the audit separates runs by "
               "gaps in the file timestamps" + (f"; run **{v['run_selected']}** was selected." if v.get("run_selected")
                                               else "."))
    st.dataframe(pd.DataFrame(runs) if isinstance(runs, list) else pd.DataFrame([runs]), hide_index=True,
                 width="stretch")
    if v.get("n_files_skipped"):
        st.caption(f"{v['n_files_skipped']} files of other runs were skipped.")
