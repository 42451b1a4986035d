"""The benchmark's own checks (bench/): its modules are imported by name, as bench/mesh_http.py
imports them when run as a script."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
