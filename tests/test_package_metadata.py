"""What the package index shows: absolute links in the long description, project URLs,
authors, a changelog. (The README is written for GitHub and a checkout: relative links.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("_tr_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() itself runs only as __main__
    return mod


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def test_long_description_has_only_absolute_links_that_resolve_in_the_repo():
    setup = _setup_module()
    text = setup.long_description()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", readme, re.M)}
    targets = re.findall(r"(?<![\w)\]])!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)", text)
    assert len(targets) >= 5, targets  # the examples, the figure, ...
    repo = urlparse(setup.REPO).path.strip("/")
    for t in targets:
        u = urlparse(t)
        assert u.scheme in ("https", "http", "mailto"), t
        if u.netloc == "raw.githubusercontent.com":
            path = u.path.split(f"/{repo}/{setup.BRANCH}/", 1)[1]
            assert (ROOT / path).is_file(), t
        elif u.netloc == "github.com" and u.path.startswith(f"/{repo}/"):
            kind, branch, path = u.path[len(repo) + 2 :].split("/", 2)
            assert branch == setup.BRANCH, t
            assert (ROOT / path).is_dir() if kind == "tree" else (ROOT / path).is_file(), t
        elif u.netloc == "github.com" and u.path.strip("/") == repo and u.fragment:
            assert u.fragment in anchors, t
    # the figure is an image on the index page too
    assert re.search(r"!\[[^\]]*\]\(https://raw\.githubusercontent\.com/[^)]+/docs/demo\.png\)", text)
    # code is left alone
    assert text.count("```") == readme.count("```")


def test_link_rewriting_rules(tmp_path):
    setup = _setup_module()
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "a.py").write_text("")
    (tmp_path / "README.md").write_text(
        "[dir](examples) [file](examples/a.py#L3) ![img](docs/x.png) [sec](#the-demo) "
        "[abs](https://example.org/x) `m[0](x)`\n```python\nmodel[0](x); [q](r)\n```\n"
    )
    out = setup.long_description(tmp_path)
    r = setup.REPO
    assert f"[dir]({r}/tree/main/examples)" in out
    assert f"[file]({r}/blob/main/examples/a.py#L3)" in out
    assert "![img](https://raw.githubusercontent.com/" in out and "/main/docs/x.png)" in out
    assert f"[sec]({r}#the-demo)" in out
    assert "[abs](https://example.org/x)" in out
    assert "`m[0](x)`" in out and "model[0](x); [q](r)" in out


def test_pyproject_metadata_for_the_index():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["authors"] and all(a.get("name") for a in meta["authors"])
    urls = meta["urls"]
    for key in ("Homepage", "Source", "Issues", "Changelog"):
        assert urls[key].startswith("https://"), key
    assert urls["Changelog"].endswith("/CHANGELOG.md")
    assert "readme" in meta.get("dynamic", [])  # from setup.py: the README, links absolute


def test_changelog_has_the_release_and_the_next_entry():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    heads = re.findall(r"^## (.+)$", text, re.M)
    assert heads[0].startswith("[Unreleased]"), heads
    assert any(h.startswith("[0.1.0]") for h in heads), heads
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert any(h.startswith(f"[{version}]") for h in heads), (version, heads)
