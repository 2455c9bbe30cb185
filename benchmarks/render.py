"""Render benchmark JSON files (from ``bench --json``) as the Markdown tables of RESULTS.md
and the README.

    python benchmarks/render.py benchmarks/results/micro-*-1-thread.json
    python benchmarks/render.py --stat min benchmarks/results/e2e-native.json
    python benchmarks/render.py --targets benchmarks/results/micro-*-default-threads.json
    python benchmarks/render.py --readme README.md benchmarks/results/micro-*.json \\
        benchmarks/results/e2e-native.json

Micro rows of all files given are merged into one table (in file order); end-to-end
results are rendered per file. ``--targets``: the issue-16 targets for the elementwise
rules, met or missed, through the Regularizer. ``--readme FILE``: rewrite the blocks
between ``<!-- perf:NAME -->`` and ``<!-- /perf:NAME -->`` in FILE (NAME = default,
1-thread, e2e) with the compact tables of the README's Performance section.
"""

from __future__ import annotations

import argparse
import json
import re

from torch_regularizers import bench

ELEMENTWISE = ("l2", "l1", "elasticnet")
#: issue 16 item 1: through the Regularizer at the default thread count
TARGETS = {"large": 1.15, "transformer": 1.15, "tiny": 1.5}
NAMES = {"l2": "L2", "l1": "L1", "elasticnet": "ElasticNet", "grouplasso": "GroupLasso", "maxnorm": "MaxNorm"}


def _load(files):
    return [json.load(open(f, encoding="utf-8")) for f in files]


def _merged(results):
    merged = dict(results[0])
    merged["micro"] = [row for r in results for row in r["micro"]]
    merged["e2e"] = [row for r in results for row in r["e2e"]]
    merged["command"] = " ; ".join(r["command"] for r in results)
    return merged


def _cell(row, col, stat="ratio"):
    m = row["methods"].get(col)
    return None if m is None else m[stat]


def targets_table(results, stat="ratio") -> str:
    """Per set and column (Regularizer with native, Regularizer[aten]): the worst elementwise
    rule's ratio, and met / missed against the item-1 targets."""
    rows = [r for res in results for r in res["micro"] if r["penalty"] in ELEMENTWISE]
    out = ["| set | target | kernels | worst rule · mode | ratio | every rule · mode | |", "|---|---|---|---|---|---|---|"]
    for s, tgt in TARGETS.items():
        rs = [r for r in rows if r["set"] == s]
        if not rs:
            continue
        for col, label in (("Regularizer", "native"), ("Regularizer[aten]", "aten")):
            vals = [(_cell(r, col, stat), f"{NAMES[r['penalty']]} {r['mode']}") for r in rs if _cell(r, col, stat) is not None]
            if not vals:
                continue
            worst = max(vals)
            every = ", ".join(f"{n} {v:.2f}×" for v, n in vals)
            missed = [n for v, n in vals if v > tgt]
            verdict = "**met**" if not missed else f"missed: {', '.join(missed)}"
            out.append(f"| {s} | ≤ {tgt}× | {label} | {worst[1]} | {worst[0]:.2f}× | {every} | {verdict} |")
    return "\n".join(out)


def overhead_table(results, stat="ratio") -> str:
    """The Regularizer's own per-call work, in floors: Regularizer − library (same backend)."""
    out = ["| set | rule · mode | library[native] | Regularizer | overhead (floors) |", "|---|---|---|---|---|"]
    for res in results:
        for r in res["micro"]:
            lib, reg = _cell(r, "library[native]", stat), _cell(r, "Regularizer", stat)
            if lib is None or reg is None or r["penalty"] not in ELEMENTWISE:
                continue
            out.append(f"| {r['set']} | {NAMES[r['penalty']]} {r['mode']} | {lib:.2f}× | {reg:.2f}× | {reg - lib:+.2f} |")
    return "\n".join(out)


def readme_micro(results, stat="ratio") -> str:
    """penalty · mode × set, cells "Regularizer (native) / Regularizer[aten]"."""
    rows = [r for res in results for r in res["micro"]]
    sets = [s for s in bench.SETS if any(r["set"] == s for r in rows)]
    cases = []
    for r in rows:
        c = (r["penalty"], r["mode"])
        if c not in cases:
            cases.append(c)
    head = ["penalty · mode", *(("2000 tiny" if s == "tiny" else s) for s in sets), "loss term + backward (large / tiny)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for kind, mode in cases:
        cells = [f"{NAMES.get(kind, kind)} · {mode}" if kind != "maxnorm" else "MaxNorm (constraint)"]
        lb = []
        for s in sets:
            r = next((x for x in rows if x["set"] == s and (x["penalty"], x["mode"]) == (kind, mode)), None)
            if r is None:
                cells.append("–")
                continue
            a, b = _cell(r, "Regularizer", stat), _cell(r, "Regularizer[aten]", stat)
            cells.append(f"{a:.2f}×" + ("" if b is None else f" / {b:.2f}×"))
            if s in ("large", "tiny"):
                v = _cell(r, "loss+backward", stat)
                lb.append("–" if v is None else f"{v:.1f}×")
        cells.append(" / ".join(lb) if lb and any(x != "–" for x in lb) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_e2e(results) -> str:
    by_model: dict[str, dict[str, dict]] = {}
    for res in results:
        for r in res["e2e"]:
            by_model.setdefault(r["model"], {}).update(r["variants"])
    models = list(by_model)
    label = {"mlp": "wide MLP 3 × 4096², batch 8 (optimizer-bound)", "transformer": "4-layer d=256 transformer, batch 16×64"}
    lines = ["| variant | " + " | ".join(label.get(m, m) for m in models) + " |", "|---|" + "---|" * len(models)]
    names = [n for n in next(iter(by_model.values())) if n != "none"]
    for n in names:
        cells = [f"{by_model[m][n]['overhead_pct']:+.1f} %" if n in by_model[m] else "–" for m in models]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _replace(text: str, name: str, body: str) -> str:
    pat = re.compile(rf"(<!-- perf:{re.escape(name)} -->\n).*?(<!-- /perf:{re.escape(name)} -->)", re.S)
    if not pat.search(text):
        raise SystemExit(f"render: no <!-- perf:{name} --> block in the README")
    return pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--stat", choices=("median", "min"), default="median")
    ap.add_argument("--targets", action="store_true", help="the item-1 targets table (and the Regularizer overhead)")
    ap.add_argument("--readme", metavar="FILE", help="rewrite the perf blocks of this README")
    args = ap.parse_args()
    stat = "ratio" if args.stat == "median" else "ratio_min"
    results = _load(args.files)
    if args.readme:
        micro = [r for r in results if r["micro"]]
        top = max(r["machine"]["threads"] for r in micro)
        text = open(args.readme, encoding="utf-8").read()
        text = _replace(text, "default", readme_micro([r for r in micro if r["machine"]["threads"] == top], stat))
        one = [r for r in micro if r["machine"]["threads"] == 1]
        if one and top != 1:
            text = _replace(text, "1-thread", readme_micro(one, stat))
        e2e = [r for r in results if r["e2e"]]
        if e2e:
            text = _replace(text, "e2e", readme_e2e(e2e))
        open(args.readme, "w", encoding="utf-8").write(text)
        print(f"rewrote the perf blocks of {args.readme}")
        return 0
    if args.targets:
        print(targets_table(results, stat))
        print()
        print(overhead_table(results, stat))
        return 0
    print(bench.format_markdown(_merged(results), stat))
    loads = [(r["machine"].get("load_avg"), r["machine"].get("load_avg_end")) for r in results]
    print(f"\nLoad average (1, 5, 15 min) at start/end of each run: {loads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
