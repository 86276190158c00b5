import os
import sys
from pathlib import Path

# See stages/__init__.py: spinning OpenMP threads collapse throughput on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
# Reference files for tests, copied from ../shared/testdata so a clean clone has them
# (testdata/lpips: the LPIPS authors' example images, BSD-2-Clause, see its LICENSE).
TESTDATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))
