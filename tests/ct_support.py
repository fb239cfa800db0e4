"""circuit-tracer 0.5.0, the field's own tool, as the judge of our circuit-tracer export.

circuit-tracer pins transformers<=4.57.3, so it lives in its own venv (scripts/make_ct_venv.sh,
default .venv-ct/, or $CT_VENV); the scripts in tests/ct_viewer/ run under that venv's python.
Its viewer page loads d3, d3-jetpack, dagre and pako from CDNs; `route_viewer_scripts` answers
those requests with the npm packages that scripts/make_ct_viewer_assets.sh installs into
tests/ct_viewer/node_modules (test setup only, never served by the app)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from helpers import stop_process

ROOT = Path(__file__).resolve().parents[1]
CT_DIR = ROOT / "tests" / "ct_viewer"
NODE_MODULES = CT_DIR / "node_modules"
SETUP_HINT = "run scripts/make_ct_venv.sh and scripts/make_ct_viewer_assets.sh (scripts/test.sh does)"


#: Where scripts/test.sh builds the venv unless CT_VENV says otherwise (outside the checkout, so
#: fresh clones reuse it); scripts/make_ct_venv.sh alone builds .venv-ct/.
SHARED_VENV = Path.home() / ".cache" / "sae-pathway-explorer" / "venv-ct"


def ct_python() -> Path:
    """$CT_VENV, else .venv-ct/ in the checkout, else the shared one scripts/test.sh builds."""
    if os.environ.get("CT_VENV"):
        venv = Path(os.environ["CT_VENV"]).expanduser()
        venv = venv if venv.is_absolute() else ROOT / venv
    else:
        venv = ROOT / ".venv-ct"
        if not (venv / "bin" / "python").exists():
            venv = SHARED_VENV
    return venv / "bin" / "python"


def require_ct() -> Path:
    """The circuit-tracer venv's python; a missing venv fails the test (it is part of the setup)."""
    py = ct_python()
    assert py.exists(), f"no circuit-tracer venv at {py.parent.parent}: {SETUP_HINT}"
    return py


def validate(folder: Path) -> dict:
    """Validate every graph listed in folder/graph-metadata.json with circuit-tracer's models."""
    r = subprocess.run([str(require_ct()), str(CT_DIR / "validate_ct.py"), str(folder)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"circuit-tracer's models reject the export:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ct_server(folder: Path):
    """circuit-tracer's own request handler and viewer serving `folder` on 127.0.0.1; yields the URL."""
    port = free_port()
    proc = subprocess.Popen([str(require_ct()), str(CT_DIR / "serve_ct.py"), str(folder), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"circuit-tracer's server did not start: {line}{proc.stderr.read()[-3000:]}"
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


def _read(*rel: str) -> str:
    parts = []
    for r in rel:
        p = NODE_MODULES / r
        assert p.is_file(), f"{p} missing: {SETUP_HINT}"
        parts.append(p.read_text(encoding="utf-8"))
    return "\n;\n".join(parts)


# npm's d3-jetpack (2.1.0: its last build that extends the page's global d3) was written for d3
# v4/v5; the page's 2024 fork of it, which is not on npm, differs in three things the viewer uses:
# conventions() returns c.drawAxis(svg), nestBy groups with d3 v7's groups (no d3.nest in v7),
# and event handlers take (event, d), where 2.1.0's tooltip reads d3.event.
JETPACK_V7 = """
;(function () {
  var conventions = d3.conventions, drawAxis = d3.drawAxis;
  d3.conventions = function (c) {
    c = conventions(c);
    c.drawAxis = function (svg) { return drawAxis(Object.assign({}, c, {svg: svg || c.svg})); };
    return c;
  };
  d3.nestBy = function (array, key) {
    return d3.groups(array, key).map(function (g) { g[1].key = g[0]; return g[1]; });
  };
  Object.defineProperty(d3, 'event', {get: function () { return window.event; }});
})();
"""


def viewer_scripts() -> dict[str, str]:
    """Body for each CDN script of circuit-tracer's index.html, by file name."""
    return {
        "d3.js": _read("d3/dist/d3.min.js"),
        "jetpack_2024-07-20.js": _read("d3-jetpack/build/d3-jetpack.js") + JETPACK_V7,
        "dagre.min.js": _read("dagre/dist/dagre.min.js"),
        "pako.min.js": _read("pako/dist/pako.min.js"),
        # a parser for .npy files (graphs are JSON) and a live-reload client for development
        "npy_v0.js": "window.npyjs = {parse: function () { throw new Error('npy files are not served'); }};",
        "hotserver-client-ws.js": "",
    }


def route_viewer_scripts(page, base_url: str) -> list[str]:
    """Serve the page's CDN scripts from node_modules; every other outside request (feature
    examples of the lab's own SAEs) gets a 404 and is listed in the returned list."""
    scripts = viewer_scripts()
    local = urlparse(base_url).netloc
    outside: list[str] = []

    def handle(route):
        url = urlparse(route.request.url)
        if url.netloc == local:
            return route.continue_()
        name = url.path.rsplit("/", 1)[-1]
        if name in scripts:
            return route.fulfill(status=200, body=scripts[name], content_type="application/javascript")
        outside.append(route.request.url)
        return route.fulfill(status=404, body="")

    page.route("**/*", handle)
    return outside
