"""Markdown helpers shared by the site's hook and Griffe extension (docs/_ext/)."""

from __future__ import annotations

import re

_BULLET = re.compile(r"^\s*(?:[-*+]|\d+\.) ")


def list_indent(text: str) -> str:
    """GitHub nests list content by 2 spaces, Python-Markdown needs 4: inside a list, double
    the indentation of continuation lines and nested items, and shift a fenced block by what
    its fence line was shifted."""
    out: list[str] = []
    in_list = loose = False
    fence_shift: int | None = None
    lines = text.split("\n")
    for n, line in enumerate(lines):
        k = len(line) - len(line.lstrip(" "))
        if fence_shift is not None:  # inside a fenced block that starts in a list item
            out.append(" " * fence_shift + line if line.strip() else line)
            if line.lstrip().startswith("```"):
                fence_shift = None
            continue
        if not line.strip():
            loose = loose or in_list
            nxt = next((ln for ln in lines[n + 1 :] if ln.strip()), "")
            if not nxt.startswith(" ") and not _BULLET.match(nxt):
                in_list = False
            out.append(line)
            continue
        if k == 0:
            bullet = bool(_BULLET.match(line))
            if bullet and in_list and loose and out and out[-1].strip():
                out.append("")  # the item before has paragraphs: Python-Markdown needs the gap
            if bullet:
                loose = False
            in_list = bullet or (in_list and bool(out) and bool(out[-1].strip()))
            out.append(line)
            continue
        if in_list:
            if line.lstrip().startswith("```"):
                fence_shift = k
            out.append(" " * k + line)
        else:
            out.append(line)
    return "\n".join(out)
