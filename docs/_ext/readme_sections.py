"""MkDocs hook of the documentation site (``mkdocs.yml``; not part of the package).

A page line ``<!-- readme: HEADING -->`` is replaced by the body of the README section
``## HEADING`` (up to the next ``## ``), so the README and the site share one copy of the
quick start, the tables and the FAQ. Options, separated by `` | ``:

* ``from: TEXT`` — start at the first line of the section that starts with TEXT;
* ``to: TEXT`` — stop before the first later line that starts with TEXT.

A heading or marker that is not found fails the build. Links in the included text are
rewritten for the site: ``docs/x`` → the page-relative ``x``; ``#anchor`` of a README
section → the page that includes that section; other relative paths (``examples/…``,
``benchmarks/…``) → the file in the repository (``repo_url``). List items nested by 2 spaces
(GitHub) are re-indented by 4 (Python-Markdown).
"""

from __future__ import annotations

import importlib.util
import posixpath
import re
from pathlib import Path

from markdown.extensions.toc import slugify
from mkdocs.exceptions import PluginError

_spec = importlib.util.spec_from_file_location("_torch_regularizers_docs__markdown", Path(__file__).with_name("_markdown.py"))
_md = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_md)

_DIRECTIVE = re.compile(r"^<!-- readme: (.+?) -->[ \t]*$", re.M)
# [text](target) and ![alt](target) (not `f[0](x)`: no name, ")" or "]" before the "[")
_LINK = re.compile(r"((?<![\w)\]])!?\[(?:[^\[\]]|\[[^\]]*\])*\]\()([^)\s]+)(\)|\s)")

_sections: dict[str, list[str]] = {}
_anchor_pages: dict[str, str] = {}  # README heading anchor -> docs page (src uri)


def _parse(readme: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    fence = False
    for line in readme.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        if not fence and line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
            continue
        if not fence and line.startswith("# "):
            current = None
            continue
        if current is not None:
            current.append(line)
    return sections


def _directive(spec: str) -> tuple[str, str | None, str | None]:
    heading, *opts = (s.strip() for s in spec.split(" | "))
    start = end = None
    for opt in opts:
        key, _, value = opt.partition(":")
        if key.strip() == "from":
            start = value.strip()
        elif key.strip() == "to":
            end = value.strip()
        else:
            raise PluginError(f"readme directive {spec!r}: unknown option {key!r}")
    return heading, start, end


def on_config(config):
    readme = Path(config.config_file_path).resolve().parent / "README.md"
    _sections.clear()
    _sections.update(_parse(readme.read_text(encoding="utf-8")))
    return config


def on_files(files, config):
    _anchor_pages.clear()
    for f in files.documentation_pages():
        text = Path(f.abs_src_path).read_text(encoding="utf-8")
        for m in _DIRECTIVE.finditer(text):
            heading = _directive(m.group(1))[0]
            _anchor_pages.setdefault(slugify(heading, "-"), f.src_uri)
    return files


def _rewrite_links(text: str, page_uri: str, repo_url: str, root: Path) -> str:
    here = posixpath.dirname(page_uri) or "."

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)", target):  # https:, mailto:, //host
            return m.group(0)
        path, _, anchor = target.partition("#")
        if not path:
            page = _anchor_pages.get(anchor)
            new = f"{repo_url}#{anchor}" if page is None else posixpath.relpath(page, here)
        elif path.startswith("docs/"):
            new = posixpath.relpath(path[len("docs/") :], here) + (f"#{anchor}" if anchor else "")
        else:
            kind = "tree" if (root / path).is_dir() else "blob"
            new = f"{repo_url}/{kind}/main/{path}" + (f"#{anchor}" if anchor else "")
        return f"{m.group(1)}{new}{m.group(3)}"

    # fenced code blocks are kept as they are
    parts = re.split(r"(^```.*?^```[ \t]*$)", text, flags=re.M | re.S)
    return "".join(p if i % 2 else _LINK.sub(fix, p) for i, p in enumerate(parts))


def on_page_markdown(markdown, page, config, files):
    repo_url = (config.repo_url or "").rstrip("/")

    def include(m: re.Match) -> str:
        heading, start, end = _directive(m.group(1))
        if heading not in _sections:
            raise PluginError(
                f"{page.file.src_uri}: README.md has no section '## {heading}' "
                f"(sections: {', '.join(_sections)})"
            )
        lines = _sections[heading]
        if start is not None:
            idx = next((i for i, ln in enumerate(lines) if ln.startswith(start)), None)
            if idx is None:
                raise PluginError(f"{page.file.src_uri}: no line starting with {start!r} in README '## {heading}'")
            lines = lines[idx:]
        if end is not None:
            idx = next((i for i, ln in enumerate(lines) if i and ln.startswith(end)), None)
            if idx is None:
                raise PluginError(f"{page.file.src_uri}: no line starting with {end!r} in README '## {heading}'")
            lines = lines[:idx]
        text = _md.list_indent("\n".join(lines).strip("\n"))
        return _rewrite_links(text, page.file.src_uri, repo_url, Path(config.config_file_path).resolve().parent)

    return _DIRECTIVE.sub(include, markdown)
