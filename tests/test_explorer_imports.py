"""The UI process never imports torch or transformers, and only explorer.widgets imports streamlit.

A fresh interpreter imports every explorer module and runs every page under AppTest on a
synthetic cache, then reports which heavy modules ended up in sys.modules."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
sys.path[:0] = [ROOT, ROOT + "/tests"]
from cache_factory import make_cache
make_cache(CACHE, "small", seed=0)
import pathlib  # a demo marker, so that the home page's demo panel runs too
pathlib.Path(CACHE, "demo").mkdir()
pathlib.Path(CACHE, "demo", "DEMO.json").write_text('{"demo": true, "complete": true, "learned": {"ok": true}}')
import explorer.context, explorer.data, explorer.demo, explorer.figures, explorer.graph, explorer.jobs, explorer.style, explorer.views
import explorer.widgets
from streamlit.testing.v1 import AppTest
sys.argv = ["app.py", "--cache", CACHE]
bad = []
for page in [None, "pages/1_Audit.py", "pages/2_Features.py", "pages/3_Pathway.py", "pages/4_Tokens.py",
             "pages/5_Live_prototype.py"]:
    at = AppTest.from_file(ROOT + "/app.py", default_timeout=60)
    if page:
        at.switch_page(page)
    at.query_params["feature"] = FEATURE
    at.run()
    bad += [f"{page}: {e.value}" for e in at.exception]
print(json.dumps({"exceptions": bad, "heavy": sorted(m for m in ("torch", "transformers", "safetensors")
                                                     if m in sys.modules)}))
"""


def test_ui_process_never_imports_torch(tmp_path):
    cache = tmp_path / "cache"
    code = SCRIPT.replace("ROOT", repr(str(ROOT))).replace("CACHE", repr(str(cache))).replace("FEATURE", repr("L3-235"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["exceptions"] == []
    assert out["heavy"] == []


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_widgets_imports_streamlit():
    files = sorted((ROOT / "explorer").glob("*.py"))
    assert files
    for f in files:
        mods = imported_modules(f)
        assert not mods & {"torch", "transformers"}, f
        assert ("streamlit" in mods) == (f.name == "widgets.py"), f
    for f in [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]:
        assert not imported_modules(f) & {"torch", "transformers"}, f
