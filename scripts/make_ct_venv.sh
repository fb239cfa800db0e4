#!/usr/bin/env bash
# Build .venv-ct/: circuit-tracer 0.5.0 in its own virtual environment, used only by the tests that
# check our circuit-tracer export against circuit-tracer's own graph models and viewer.
# Its own venv because circuit-tracer pins transformers<=4.57.3, which clashes with the project's.
# Idempotent: an existing venv that already imports circuit_tracer 0.5.0 is kept (CI cache).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CT_VENV:-.venv-ct}"
PY="$VENV/bin/python"

if [ -x "$PY" ] && "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('circuit-tracer') != '0.5.0')" 2>/dev/null \
   && "$PY" -c "import circuit_tracer.frontend.graph_models, circuit_tracer.frontend.local_server" 2>/dev/null; then
  echo "make_ct_venv: $VENV already has circuit-tracer 0.5.0"
  exit 0
fi

python -m venv "$VENV"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip
# torch first and pinned: the CPU wheel on local disk (pip's find-links); an unpinned torch would pull a
# multi-GB CUDA build as circuit-tracer's dependency.
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check "circuit-tracer==0.5.0" "torch==2.13.0"
"$PY" -c "import circuit_tracer.frontend.graph_models, circuit_tracer.frontend.local_server; print('make_ct_venv: ok')"
