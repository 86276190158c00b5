"""What every DVC stage module shares: logging, CPU settings, and user-facing errors.

A stage's `main` runs under `run_stage`: a known problem of the user's inputs
(params, data, shards, checkpoints) ends the process with one line naming the
stage and what to fix, instead of a traceback.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from cmpipe.distributed.device import fast_cpu_defaults
from cmpipe.errors import USER_ERRORS


def run_stage(name: str, main: Callable[[], None]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    fast_cpu_defaults()
    log = logging.getLogger(f"stages.{name}")
    t0 = time.perf_counter()
    from cmpipe.distributed import ddp as distributed

    try:
        main()
    except USER_ERRORS as e:
        raise SystemExit(f"{name}: {e}")
    finally:
        distributed.shutdown()
    log.info("stage %s finished in %.1fs", name, time.perf_counter() - t0)
