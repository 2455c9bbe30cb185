"""Micro benchmarks of the penalty kernels against the floor (docs/design.md §8).

A thin wrapper over ``torch_regularizers.bench`` (the same code as
``python -m torch_regularizers bench``) that skips the end-to-end part::

    python benchmarks/kernels.py                   # every penalty × mode × set, tables
    python benchmarks/kernels.py --native          # also the fused C++ kernels (built once)
    python benchmarks/kernels.py --sets tiny --penalties l1 --modes grad --reps 60
    python benchmarks/kernels.py --json > micro.json

Every option of ``bench`` works (``--help``).
"""

from __future__ import annotations

import sys

from torch_regularizers import bench

if __name__ == "__main__":
    raise SystemExit(bench.main(["--no-e2e", *sys.argv[1:]]))
