"""SAE pathway explorer, home page: what the cache holds and which steps are done.

Run: streamlit run app.py -- [--config FILE] [--cache DIR]   (or: python -m engine explore)
Pages live in pages/; their logic in explorer/. No torch in this process.
"""

import pandas as pd
import streamlit as st

from explorer import data, views
from explorer.demo import demo_info
from explorer.widgets import PAGES, demo_panel, fmt, page_setup

ctx = page_setup("Home", ":material/hub:")

st.title("SAE pathway explorer")
st.caption("Causal SAE features of LLaMA-3.1-8B in the gambling study, their upstream pathways and the tokens "
           "they relate to. Everything shown here is read from the cache the engine wrote.")
if (demo := demo_info(ctx)) is not None:
    demo_panel(demo)

cfg = ctx.cfg
c1, c2 = st.columns([3, 2])
with c1.container(border=True):
    st.markdown("**Model and SAEs**")
    st.markdown(
        f"- Model: `{cfg.model.name_or_path}` ({cfg.model.dtype})\n"
        f"- SAEs: `{cfg.sae.source}`, encode convention **{cfg.sae.convention}**\n"
        f"- Study checkpoints: `{cfg.data.checkpoints_dir or 'not configured'}`\n"
        f"- Response logs: `{cfg.data.responses_dir or 'not configured'}`"
    )
with c2.container(border=True):
    st.markdown("**Cache**")
    st.markdown(f"`{ctx.cache}`")
    if ctx.config_error:
        st.warning(f"The config could not be read, defaults are shown: {ctx.config_error}", icon=":material/warning:")

if not ctx.cache.is_dir():
    st.warning(f"The cache folder `{ctx.cache}` does not exist yet.", icon=":material/folder_off:")
    st.markdown("Fill it by running the pipeline (or build the embedded demo):")
    st.code(f"python -m engine run{' --config ' + ctx.config_path if ctx.config_path else ''} --cache {ctx.cache}\n"
            "python -m engine demo", language="bash")
    st.stop()

m = data.manifest(ctx)
if m.get("problem"):
    st.warning(f"The step record {m['problem']}; statuses below come from the files alone.", icon=":material/rule:")

st.subheader("Pipeline steps")
statuses = data.step_statuses(ctx)
STATUS_COLOURS = {"done": "#e3f1e8", "stale": "#fdf0d5", "failed": "#fbe0dd", "missing": "#f1f1f1"}
rows = [{
    "step": data.STEP_TITLES[s.step],
    "status": s.status,
    "started": s.started or "",
    "time": s.seconds,
    "peak memory (GB)": s.peak_memory_gb,
    "device": s.device or "",
    "writes": s.artifact,
    "note": (s.error if s.status == "failed" else s.note) or "",
} for s in statuses]
# a step that never ran has no time or memory: "–", not the grid's "None"
frame = views.numbers_as_text(pd.DataFrame(rows), {"time": "{:.1f}", "peak memory (GB)": "{:.2f}"})
table = frame.style.map(lambda v: f"background-color: {STATUS_COLOURS.get(v, '')}", subset=["status"])
st.dataframe(
    table, hide_index=True, width="stretch",
    column_config={
        "time": st.column_config.TextColumn("time (s)", help="Wall-clock seconds of the step's last run"),
        "peak memory (GB)": st.column_config.TextColumn(
            help="Peak resident memory on CPU, or peak allocated CUDA memory on a GPU, of the last run"),
        "status": st.column_config.TextColumn(
            help="done: output present; stale: a step it reads ran after it; failed: last run raised an error; "
                 "missing: no output yet"),
        "started": st.column_config.TextColumn(help="When the step's last run started (local time)"),
        "note": st.column_config.TextColumn(width="large"),
    },
)
todo = [s for s in statuses if s.status != "done"]
if todo:
    st.markdown("**To fill in what is missing or out of date**, run:")
    st.code("\n".join(s.command for s in todo if s.command), language="bash")
else:
    st.success("Every step is done and up to date.", icon=":material/task_alt:")

st.subheader("Explore")
counts = {
    "features": None, "pathways": len(data.pathway_features(ctx)), "tokens": len(data.token_features(ctx)),
    "prototypes": len(data.prototype_features(ctx)),
}
try:
    counts["features"] = len(data.causal_features(ctx)[1])
except data.CacheProblem:
    pass
cards = [
    ("audit", ":material/fact_check:", "Audit", "Data checks on the study's checkpoints and response logs."),
    ("features", ":material/list:", "Features",
     f"{fmt(counts['features'])} causal feature{'' if counts['features'] == 1 else 's'} by layer and direction."
     if counts["features"] is not None
     else "No causal feature list yet."),
    ("pathway", ":material/account_tree:", "Pathway", f"{fmt(counts['pathways'])} pathway graph{'' if counts['pathways'] == 1 else 's'} with replay validation."),
    ("tokens", ":material/text_fields:", "Tokens", f"Token views for {fmt(counts['tokens'])} features."),
    ("live", ":material/play_circle:", "Live prototype", "Run any feature on a prompt now, on CPU or GPU."),
]
cols = st.columns(len(cards))
for col, (page, icon, label, text) in zip(cols, cards):
    with col.container(border=True, height="stretch"):
        st.page_link(PAGES[page], label=label, icon=icon)
        st.caption(text)
