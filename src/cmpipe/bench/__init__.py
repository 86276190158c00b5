"""Throughput benchmarks, one JSON line each (`python -m cmpipe.bench <name>`), and the streaming
webdataset loader they time (`cmpipe.bench.streaming`)."""
import os

# Before torch loads its OpenMP runtime (see stages/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cmpipe.bench.data import loader
from cmpipe.bench.inference import sampling, trajectories
from cmpipe.bench.training import distill_step, scaling

__all__ = ["distill_step", "loader", "sampling", "scaling", "trajectories"]
