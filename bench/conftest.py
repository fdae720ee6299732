"""pytest-benchmark set-up for ``pytest bench/ --benchmark-only`` (the CPU microbenchmarks).

``AIMV2_BENCH_QUICK=1`` swaps every shape for the tiny ``--quick`` ones (the CI smoke test runs the file that way
with ``--benchmark-disable``).
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("AIMV2_CHECK_VALUES", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
