"""Tokens: logit lens, prompt tokens by activation, behavioural words; ?feature=L12-3456."""

import pandas as pd
import streamlit as st

from explorer import data, figures, style, views
from explorer.widgets import PAGES, empty_state, feature_picker, fmt, load, metric_row, page_setup, stale_banner

ctx = page_setup("Tokens", ":material/text_fields:")
st.title("Token views")

files = data.token_features(ctx)
c1, c2 = st.columns([1.3, 3])
feature = feature_picker(files, where=c1)
stale_banner(ctx, "tokens", "These token views")
if not files and feature is None:
    empty_state("No token views in this cache yet. The tokens step writes one per selected causal feature:",
                data.engine_command(ctx, "tokens"), ":material/text_fields:")
if feature is None:
    empty_state("Choose a feature above, or open one from the Features or Pathway page.", icon=":material/touch_app:")

tok = load(data.tokens, ctx, feature)
if tok is None:
    st.warning(f"No token views for {feature} in this cache.", icon=":material/text_fields:")
    st.code(data.tokens_command(ctx, feature), language="bash")
    st.stop()
c2.markdown(f"### {feature}")
c2.page_link(PAGES["pathway"], label=f"Pathway of {feature}", icon=":material/account_tree:",
             query_params={"feature": feature})

stats = tok.get("activation_stats") or {}
pa = tok.get("prompt_activations") or {}
words = tok.get("behavioural_words") or []
metric_row([
    ("Density", fmt(stats.get("density"), pct=True),
     "Share of sampled response tokens on which the feature is active (Neuronpedia's activation density)"),
    ("Max activation (responses)", fmt(stats.get("max_activation_sample")), "Largest activation over the sampled responses"),
    ("Last token, safe", fmt((pa.get("safe") or {}).get("last_token_activation")),
     "Activation at the last token of the safe prompt (where the study patched)"),
    ("Last token, risky", fmt((pa.get("risky") or {}).get("last_token_activation")),
     "Activation at the last token of the risky prompt"),
    ("Significant words", fmt(sum(1 for w in words if w.get("significant"))),
     "Terms whose frequency in the responses changes significantly with patching (BH-corrected)"),
])

t_lens, t_words = st.columns(2, gap="large")

with t_lens:
    st.subheader("Output tokens")
    lens = tok.get("logit_lens") or {}
    if not lens.get("promoted") and not lens.get("suppressed"):
        st.info("No logit-lens entries in this file.", icon=":material/info:")
    else:
        st.plotly_chart(figures.logit_lens_figure(lens.get("promoted"), lens.get("suppressed")), key="tok_lens",
                        config={"displaylogo": False})
        st.caption("The feature's decoder direction through the final norm and the unembedding: which next tokens "
                   "it pushes up (red) or down (blue).")

with t_words:
    st.subheader("Behavioural words")
    if not words:
        st.info("No behavioural word statistics for this feature (the audit found no response texts, or none "
                "passed the minimum count).", icon=":material/info:")
    else:
        df = pd.DataFrame(words)
        group_cols = [c for c in ("prompt", "patch", "tokenization") if c in df.columns]
        if group_cols:
            groups = df[group_cols].drop_duplicates().astype(str).agg(" · ".join, axis=1).tolist()
            choice = st.selectbox("Comparison", groups, help="Prompt · patch (vs the same prompt's baseline) · tokenization")
            df = df[df[group_cols].astype(str).agg(" · ".join, axis=1) == choice]
        only_sig = st.toggle("Only significant", value=False)
        if only_sig and "significant" in df.columns:
            df = df[df["significant"].astype(bool)]
        keep = [c for c in ("term", "count_patched", "count_baseline", "log_odds", "z", "q", "significant") if c in df.columns]
        st.dataframe(df[keep], hide_index=True, width="stretch", column_config={
            "term": st.column_config.TextColumn(help="Word or token"),
            "count_patched": st.column_config.NumberColumn("with patch", help="Occurrences in patched responses"),
            "count_baseline": st.column_config.NumberColumn("baseline", help="Occurrences in baseline responses"),
            "log_odds": st.column_config.NumberColumn("log-odds", format="%+.3f",
                                                      help="Log-odds ratio with an informative Dirichlet prior: "
                                                           "positive = more frequent with the patch"),
            "z": st.column_config.NumberColumn(format="%+.2f", help="log-odds divided by its standard error"),
            "q": st.column_config.NumberColumn("q (BH)", format="%.3g", help="Benjamini-Hochberg adjusted p-value"),
        })

tables = views.decision_tables((tok.get("logit_lens") or {}).get("decision_summary") or [])
if tables:
    st.subheader("Effect on the decision")
    st.caption("Setting the feature's activation at the last prompt token (ablate = 0, amplify = a multiple of its "
               "largest activation, or the study's patch values) and reading the model's next-token probabilities.")
    common = {
        "value": st.column_config.NumberColumn("set to", format="%.3f", help="The activation written into the feature"),
        "activation": st.column_config.NumberColumn("was", format="%.3f", help="Its activation before"),
    }
    cols = st.columns(len(tables))
    if "choice" in tables:
        with cols[0]:
            st.markdown("**Bet or stop** (the token after 'Choice: ')")
            st.dataframe(tables["choice"], hide_index=True, width="stretch", column_config={**common,
                         "delta_bet_vs_stop_logodds": st.column_config.NumberColumn(
                             "Δ log-odds bet vs stop", format="%+.3f",
                             help="Change of log p('1') − log p('2') after the choice prompt: positive = more betting")})
    if "amount" in tables:
        with cols[-1]:
            st.markdown("**Bet amount** (after choosing to bet)")
            st.dataframe(tables["amount"], hide_index=True, width="stretch", column_config={**common,
                         "delta_mean_amount": st.column_config.NumberColumn(
                             "Δ mean bet ($)", format="%+.2f", help="Change of the expected bet amount")})

st.subheader("Input tokens")
if not pa:
    st.info("No prompt activations in this file.", icon=":material/info:")
for name, rec in pa.items():
    colour = style.prompt_colour(name)
    st.markdown(f"**{name.capitalize()} prompt** · max {fmt(rec.get('max'))} at position "
                f"{rec.get('argmax_position', '–')} · {fmt(rec.get('n_active'))} active tokens")
    st.html(figures.token_highlight_html(rec.get("tokens") or [], rec.get("activations") or [], colour))
st.caption("Background strength = the feature's activation on that token (hover for the value). "
           "The first token (BOS) is left out of the statistics.")
top = tok.get("top_activating") or []
if top:
    st.markdown("**Top activating response tokens**")
    for r in top[:10]:
        ctx_toks = r.get("context_tokens") or []
        ctx_acts = r.get("context_activations") or []
        meta = " · ".join(str(x) for x in (r.get("condition"), f"trial {r.get('trial')}") if x)
        st.markdown(f"`{figures.clean_token(r.get('token'))}` activation **{fmt(r.get('activation'))}** · {meta}")
        st.html(figures.token_highlight_html(ctx_toks, ctx_acts, style.prompt_colour(r.get("prompt", "risky"))))
