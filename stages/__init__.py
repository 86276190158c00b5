"""DVC stage modules, run as `python -m stages.<name>` from the repository root."""
import os

# OpenMP threads that spin while waiting made CPU training up to 10x slower on this
# 2-core machine whenever another process ran (measured: 4.5 s vs 0.4 s per step).
# Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
