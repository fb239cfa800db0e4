#!/usr/bin/env python
"""Write a small LLaMA-architecture fixture model, LlamaScope-layout SAEs and a config.

    python scripts/make_fixtures.py --out DIR [--layers N] [--d-model D] [--d-sae S] [--seed K]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cli import run_main  # noqa: E402
from engine.fixtures import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
