"""The package index's page: the README with its relative links made absolute.

Everything else is in pyproject.toml. The README links to files of the repository
(``examples/train_loop.py``, ``docs/demo.png``, ``#performance``) so that it reads right on
GitHub and in a checkout; on the package index those would point nowhere, so the long
description is the README with each relative link resolved against the repository:
images to their raw file, files to their page, ``#anchors`` to the README's heading on GitHub.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = "https://github.com/torch-regularizers/torch-regularizers"
BRANCH = "main"
HERE = Path(__file__).resolve().parent

# [text](target) and ![alt](target); the target stops at whitespace or ")" (an optional
# "title" after it is kept as it is). Not after a name, ")" or "]": that is code, `f[0](x)`.
_LINK = re.compile(r"(?<![\w)\]])(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)((?:\s+\"[^\"]*\")?)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)  # fenced code blocks: kept as they are
_ABSOLUTE = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # https:, mailto:, //host


def absolute(target: str, image: bool, root: Path = HERE) -> str:
    """The absolute form of one link target of the README (absolute ones are kept)."""
    if _ABSOLUTE.match(target):
        return target
    if target.startswith("#"):
        return f"{REPO}{target}"
    path, _, anchor = target.partition("#")
    path = path.removeprefix("./")
    if image:
        return f"https://raw.githubusercontent.com/{REPO.split('github.com/', 1)[1]}/{BRANCH}/{path}"
    kind = "tree" if (root / path).is_dir() else "blob"
    return f"{REPO}/{kind}/{BRANCH}/{path}" + (f"#{anchor}" if anchor else "")


def long_description(root: Path = HERE) -> str:
    """README.md with every relative link absolute (see the module docstring)."""
    text = (root / "README.md").read_text(encoding="utf-8")

    def links(prose: str) -> str:
        return _LINK.sub(lambda m: f"{m[1]}[{m[2]}]({absolute(m[3], bool(m[1]), root)}{m[4]})", prose)

    out, pos = [], 0
    for fence in _FENCE.finditer(text):
        out += [links(text[pos : fence.start()]), fence.group()]
        pos = fence.end()
    return "".join([*out, links(text[pos:])])


if __name__ == "__main__":
    from setuptools import setup

    setup(long_description=long_description(), long_description_content_type="text/markdown")
