"""SAE pathway explorer: home page (status of the cache). Run: streamlit run app.py -- --cache DIR"""

import argparse
import sys
from pathlib import Path

import streamlit as st

from engine.schema import STEP_OUTPUTS, STEPS

st.set_page_config(page_title="SAE pathway explorer", layout="wide")


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=None)
    p.add_argument("--cache", default="cache")
    a, _ = p.parse_known_args(sys.argv[1:])
    return a


args = _args()
cache = Path(args.cache)
st.title("SAE pathway explorer")
st.caption(f"cache: `{cache.resolve()}`")
rows = []
for step in STEPS:
    path = cache / STEP_OUTPUTS[step]
    rows.append({"step": step, "artifact": STEP_OUTPUTS[step], "status": "done" if path.exists() else "missing"})
st.table(rows)
