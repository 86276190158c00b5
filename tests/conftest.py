import os
import sys
from pathlib import Path

# See stages/__init__.py: spinning OpenMP threads collapse throughput on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
