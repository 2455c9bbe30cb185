"""End-to-end training-step overhead of each regularization variant (DESIGN §7).

A thin wrapper over ``torch_regularizers.bench`` that skips the micro benchmarks: an
optimizer-bound wide MLP (3 × 4096², batch 8, AdamW foreach) and a compute-bound small
transformer, no regularization vs the library's L2 decoupled / L2 grad / L1 grad /
L1 prox / ElasticNet prox / GroupLasso prox vs torch's own AdamW weight decay vs
hand-written loss terms, interleaved round-robin::

    python benchmarks/end_to_end.py                # full size (about a minute)
    python benchmarks/end_to_end.py --quick        # 3 × 1024² MLP, 2-layer d=128 transformer
    python benchmarks/end_to_end.py --models mlp --rounds 30 --json
"""

from __future__ import annotations

import sys

from torch_regularizers import bench

if __name__ == "__main__":
    raise SystemExit(bench.main(["--no-micro", *sys.argv[1:]]))
