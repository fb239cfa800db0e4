"""Write a realistic Experiment-2 directory; see engine/experiment_data.py.

    python scripts/make_experiment_data.py --out DIR --scale {tiny,small,full} [--config FILE]
        [--runs A,B] [--seed K] [--defects]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.experiment_data import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
