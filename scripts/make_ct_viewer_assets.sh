#!/usr/bin/env bash
# Install the scripts circuit-tracer's viewer page loads from CDNs (d3 v7, d3-jetpack, dagre,
# pako) from the npm registry into tests/ct_viewer/node_modules, for the browser test that opens
# our export in circuit-tracer's own viewer. Test setup only: the app never serves these.
# Idempotent: an install that already has every file the test needs is kept.
set -euo pipefail
cd "$(dirname "$0")/../tests/ct_viewer"
need=(node_modules/d3/dist/d3.min.js node_modules/d3-jetpack/build/d3-jetpack.js node_modules/dagre/dist/dagre.min.js node_modules/pako/dist/pako.min.js)
ok=1
for f in "${need[@]}"; do [ -f "$f" ] || ok=0; done
if [ "$ok" = 1 ]; then
  echo "make_ct_viewer_assets: already installed"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
fi
# versions are pinned exactly in package.json; no lock file is kept
npm install --no-audit --no-fund --no-package-lock --loglevel=error
for f in "${need[@]}"; do [ -f "$f" ] || { echo "make_ct_viewer_assets: $f missing after npm install" >&2; exit 1; }; done
echo "make_ct_viewer_assets: ok"
