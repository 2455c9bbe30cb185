"""The documentation site: ``mkdocs build --strict`` passes and its API reference documents
every public name (``tr.__all__`` and the ``__all__`` of every public submodule).

The build needs the ``[docs]`` extra (also in ``[test]``); without it those tests skip.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import torch_regularizers as tr

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PKG = ROOT / "src" / "torch_regularizers"


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # its parent package is missing
        return True


_MISSING = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python") if _missing(m)]
needs_mkdocs = pytest.mark.skipif(
    bool(_MISSING) or not (ROOT / "mkdocs.yml").exists(),
    reason=f"docs extra not installed ({', '.join(_MISSING)} missing): pip install -e '.[docs]'",
)


def _public_modules() -> dict[str, list[str]]:
    """Every public module of the package (no ``_`` in its path) -> its ``__all__`` (read from
    the source, so the optional frameworks the integrations need are not imported)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(p.startswith("_") for p in parts[1:]):
            continue
        names: list[str] = []
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                names = list(ast.literal_eval(node.value))
        out[".".join(parts)] = names
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _anchors(site: Path) -> set[str]:
    ids: set[str] = set()
    for page in (site / "api").rglob("*.html"):
        ids.update(re.findall(r'id="(torch_regularizers[^"]*)"', page.read_text(encoding="utf-8")))
    return ids


@needs_mkdocs
def test_mkdocs_build_strict(site):
    for page in ("index.html", "modes/index.html", "penalties/index.html", "design/index.html",
                 "api/index.html", "api/penalties/index.html"):
        assert (site / page).is_file(), page
    # the README sections were included, the docstrings' reST roles turned into Markdown
    for page in site.rglob("*.html"):
        assert "<!-- readme:" not in page.read_text(encoding="utf-8"), page
    assert "λ·‖θ‖₁" in (site / "penalties/index.html").read_text(encoding="utf-8")
    api = (site / "api/penalties/index.html").read_text(encoding="utf-8")
    assert ":class:`" not in api and "Args (common to every penalty)" not in api


@needs_mkdocs
def test_site_documents_every_public_name(site):
    ids = _anchors(site)
    missing = [f"tr.{n}" for n in tr.__all__ if f"torch_regularizers.{n}" not in ids]
    for mod, names in _public_modules().items():
        if mod not in ids:
            missing.append(mod)
        for n in names:
            if f"{mod}.{n}" not in ids and not (n in tr.__all__ and f"torch_regularizers.{n}" in ids):
                missing.append(f"{mod}.{n}")
    assert not missing, f"public names without an entry in the API reference: {missing}"
    # every penalty's entry lists the common arguments (as "Other Parameters")
    penalties = (site / "api/penalties/index.html").read_text(encoding="utf-8")
    for name in ("L1", "L2", "ElasticNet", "GroupLasso", "L2SP", "Orthogonal"):
        entry = penalties.split(f'id="torch_regularizers.{name}"', 1)[1].split('class="doc doc-object doc-class"', 1)[0]
        for arg in ("lr_coupling", "stochastic_rounding", "metric"):
            assert f"<code>{arg}</code>" in entry, (name, arg)


def test_api_pages_name_every_public_name():
    """Without building: every name of ``tr.__all__`` and every public module has a
    ``::: torch_regularizers.NAME`` block in docs/api/."""
    blocks = set()
    for page in (DOCS / "api").glob("*.md"):
        blocks.update(re.findall(r"^::: (torch_regularizers[\w.]*)", page.read_text(encoding="utf-8"), re.M))
    assert not [n for n in tr.__all__ if f"torch_regularizers.{n}" not in blocks]
    assert not [m for m in _public_modules() if m not in blocks]


def test_help_of_every_penalty_shows_the_common_arguments():
    for name in tr.__all__:
        obj = getattr(tr, name)
        if isinstance(obj, type) and issubclass(obj, tr.Penalty) and obj is not tr.Penalty:
            doc = obj.__doc__ or ""
            if not doc:  # python -OO
                continue
            assert doc.count("Args (common to every penalty):") == 1, name
            for arg in ("strength:", "lr_coupling:", "metric:", "stochastic_rounding:", "cautious:"):
                assert arg in doc, (name, arg)


@needs_mkdocs
def test_readme_sections_the_pages_include_exist():
    """Each ``<!-- readme: ... -->`` line of docs/*.md names a README section (and markers)
    that exist: a README heading renamed shows here, by name, as well as in the build."""
    spec = importlib.util.spec_from_file_location("_readme_hook", DOCS / "_ext" / "readme_sections.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    sections = hook._parse((ROOT / "README.md").read_text(encoding="utf-8"))
    problems, n = [], 0
    for page in sorted(DOCS.glob("*.md")):
        for m in hook._DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            n += 1
            heading, start, end = hook._directive(m.group(1))
            lines = sections.get(heading)
            if lines is None:
                problems.append(f"{page.name}: no README section '## {heading}'")
                continue
            if start is not None and not any(ln.startswith(start) for ln in lines):
                problems.append(f"{page.name}: '## {heading}' has no line starting with {start!r}")
            if end is not None and not any(ln.startswith(end) for ln in lines[1:]):
                problems.append(f"{page.name}: '## {heading}' has no line starting with {end!r}")
    assert n and not problems, problems
    # links: files of the repository, the site's own copy of docs/ files, code left alone
    out = hook._rewrite_links("[a](examples) [b](examples/x.py#L3) ![c](docs/demo.png) `f[0](x)`",
                              "modes.md", "https://github.com/o/r", ROOT)
    assert out == ("[a](https://github.com/o/r/tree/main/examples) "
                   "[b](https://github.com/o/r/blob/main/examples/x.py#L3) ![c](demo.png) `f[0](x)`")
