"""Render benchmark JSON files (from ``bench --json``) as the Markdown tables of RESULTS.md.

    python benchmarks/render.py benchmarks/results/micro-*-1-thread.json
    python benchmarks/render.py --stat min benchmarks/results/e2e-native.json

Micro rows of all files given are merged into one table (in file order); end-to-end
results are rendered per file.
"""

from __future__ import annotations

import argparse
import json

from torch_regularizers import bench


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--stat", choices=("median", "min"), default="median")
    args = ap.parse_args()
    stat = "ratio" if args.stat == "median" else "ratio_min"
    results = [json.load(open(f, encoding="utf-8")) for f in args.files]
    merged = dict(results[0])
    merged["micro"] = [row for r in results for row in r["micro"]]
    merged["e2e"] = [row for r in results for row in r["e2e"]]
    merged["command"] = " ; ".join(r["command"] for r in results)
    print(bench.format_markdown(merged, stat))
    loads = [(r["machine"].get("load_avg"), r["machine"].get("load_avg_end")) for r in results]
    print(f"\nLoad average (1, 5, 15 min) at start/end of each run: {loads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
