"""The soak lives in bench/soak.py (its long run is a bench section); its modules import each
other by their bare names, so bench/ goes on the import path, after everything else."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))
