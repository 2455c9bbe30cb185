"""Griffe extension of the documentation site (``mkdocs.yml``; not part of the package).

The package's docstrings are written for ``help()``: Google-style sections with reST
inline markup. This renders them as Markdown without editing them:

* ``:class:`~torch_regularizers.L1``` (and ``:func:``, ``:meth:``, ``:mod:``, …) become
  optional cross-references (a link where the site documents the target, code otherwise),
  resolved in the scope of the documented object and mapped to the public path
  (``torch_regularizers.penalties.L1`` → ``torch_regularizers.L1``);
* ``Example::`` / a lone ``::`` introduce an indented code block: the colons go;
* reST definition lists (a term, its definition indented under it) become ``def_list`` items;
* list items nested by 2 spaces are re-indented by 4 (Python-Markdown);
* reST simple tables (``====  ====`` borders) become Markdown tables;
* ``docs/design.md §N`` links to that section of the design page;
* the "Args (common to every penalty):" block of ``Penalty`` is its parameter table, and
  every penalty class gets the entries it takes and does not document itself as "Other
  Parameters" (at runtime ``Penalty.__init_subclass__`` appends the same block for ``help()``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import griffe
from markdown.extensions.toc import slugify

_spec = importlib.util.spec_from_file_location("_torch_regularizers_docs__markdown", Path(__file__).with_name("_markdown.py"))
_md = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_md)

PACKAGE = "torch_regularizers"
PENALTY = "torch_regularizers.penalties.Penalty"
COMMON_HEADER = "Args (common to every penalty):"

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`([^`]+)`")
_BORDER = re.compile(r"^=+(?: +=+)+\s*$")
_DESIGN_REF = re.compile(r"docs/design\.md (§\s?(\d+))")
_ITEM = re.compile(r"^    (\w+)(?: \([^)]*\))?:(?:\s|$)")
_DESIGN = Path(__file__).resolve().parents[1] / "design.md"


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _is_public(path: str) -> bool:
    return not any(part.startswith("_") for part in path.split("."))


def _public_paths(pkg: griffe.Module) -> dict[str, str]:
    """Canonical path -> the shortest public path that re-exports it."""
    out: dict[str, str] = {}
    for mod in _walk(pkg):
        if not mod.is_module or not _is_public(mod.path):
            continue
        for name, member in mod.members.items():
            if member.is_alias and not name.startswith("_"):
                public = f"{mod.path}.{name}"
                target = member.target_path
                if public.count(".") >= target.count(".") and _is_public(target):
                    continue  # an import (`from . import kernels`), not a re-export
                if target not in out or public.count(".") < out[target].count("."):
                    out[target] = public
    return out


def _design_anchors() -> dict[str, str]:
    """Section number -> heading anchor of docs/design.md ("3" -> "3-the-step-transaction")."""
    anchors = {}
    if _DESIGN.exists():
        for line in _DESIGN.read_text(encoding="utf-8").splitlines():
            m = re.match(r"^##\s+((\d+)\..*)$", line)
            if m:
                anchors[m.group(2)] = slugify(m.group(1).strip(), "-")
    return anchors


class TorchRegularizersDocstrings(griffe.Extension):
    """Markdown for the package's reST-flavoured docstrings (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.path != PACKAGE:
            return
        self.pkg = pkg
        self.public = _public_paths(pkg)
        self.design = _design_anchors()
        common = self._common_items(pkg)
        for obj in _walk(pkg):
            if obj.docstring is None:
                continue
            text = obj.docstring.value
            if common and obj.is_class:
                text = self._with_common_args(obj, text, common)
            text = _tables(text)
            text = _literal_blocks(text)
            text = _definition_lists(text)
            text = _md.list_indent(text)
            text = _ROLE.sub(lambda m, obj=obj: self._xref(m.group(1), obj), text)
            text = _DESIGN_REF.sub(self._design_ref, text)
            obj.docstring.value = text

    # -------------------------------------------------------------- common penalty arguments
    def _common_items(self, pkg: griffe.Module) -> list[tuple[str, list[str]]]:
        try:
            penalty = pkg[PENALTY[len(PACKAGE) + 1 :]]
        except KeyError:
            return []
        if penalty.docstring is None:
            return []
        lines = penalty.docstring.value.split("\n")
        try:
            start = [ln.strip() for ln in lines].index(COMMON_HEADER)
        except ValueError:
            return []
        items: list[tuple[str, list[str]]] = []
        for line in lines[start + 1 :]:
            if line.strip() and not line.startswith(" "):
                break
            m = _ITEM.match(line)
            if m:
                items.append((m.group(1), [line]))
            elif items:
                items[-1][1].append(line)
        return items

    def _with_common_args(self, cls: griffe.Object, text: str, common) -> str:
        if cls.path == PENALTY:  # the block is Penalty's own parameter table
            return text.replace(COMMON_HEADER, "Args:", 1)
        try:
            if PENALTY not in [c.path for c in cls.mro()]:
                return text
        except Exception:  # unresolvable bases: not one of ours
            return text
        own = {m.group(1) for m in map(_ITEM.match, text.split("\n")) if m}
        params = cls.parameters
        if any(p.kind is griffe.ParameterKind.var_keyword for p in params):
            takes = None  # **kwargs: forwarded to Penalty
        else:
            takes = {p.name for p in params}
        rest = [lines for name, lines in common if name not in own and (takes is None or name in takes)]
        if not rest:
            return text
        body = "\n".join(line for lines in rest for line in lines).rstrip()
        return f"{text.rstrip()}\n\nOther Parameters:\n{body}\n"

    # -------------------------------------------------------------- cross-references
    def _xref(self, content: str, obj: griffe.Object) -> str:
        content = content.strip()
        if "<" in content and content.endswith(">"):
            title, target = (s.strip() for s in content[:-1].split("<", 1))
        else:
            target = content.lstrip("~")
            title = target.rsplit(".", 1)[-1] if content.startswith("~") else target
        path = self._resolve(target.rstrip("()"), obj)
        code = f"<code>{title}</code>"
        if path is None:
            return code
        return f'<autoref identifier="{path}" optional>{code}</autoref>'

    def _resolve(self, target: str, obj: griffe.Object) -> str | None:
        if target.startswith("tr."):
            path = PACKAGE + target[2:]
        elif target == PACKAGE or target.startswith(PACKAGE + "."):
            path = target
        elif target.startswith("."):
            mod = obj if obj.is_module else obj.module
            base = mod if mod.is_init_module else mod.parent
            rest = target[1:]
            while rest.startswith(".") and base is not None:
                base, rest = base.parent, rest[1:]
            if base is None:
                return None
            path = f"{base.path}.{rest}"
        else:
            first, _, rest = target.partition(".")
            try:
                path = obj.resolve(first) + (f".{rest}" if rest else "")
            except Exception:
                return None
        if not (path == PACKAGE or path.startswith(PACKAGE + ".")):
            return None
        parts = self._canonical(path).split(".")
        for i in range(len(parts), 1, -1):  # longest re-exported prefix -> its public path
            prefix = ".".join(parts[:i])
            if prefix in self.public:
                return ".".join([self.public[prefix], *parts[i:]])
        return path

    def _canonical(self, path: str) -> str:
        """``path`` with every alias on the way replaced by its target (as far as it resolves)."""
        node = self.pkg
        parts = path.split(".")[1:]
        for i, part in enumerate(parts):
            member = node.members.get(part)
            if member is None:
                return ".".join([node.path, *parts[i:]])
            if member.is_alias:
                try:
                    member = member.final_target
                except Exception:
                    return ".".join([member.target_path, *parts[i + 1 :]])
            node = member
        return node.path

    def _design_ref(self, m: re.Match) -> str:
        anchor = self.design.get(m.group(2))
        if anchor is None:
            return m.group(0)
        return f'<autoref identifier="{anchor}" optional>docs/design.md {m.group(1)}</autoref>'


# ------------------------------------------------------------------ reST -> Markdown
def _literal_blocks(text: str) -> str:
    """``Text::`` -> ``Text:`` and a lone ``::`` line -> nothing (the indented block after
    it is a Markdown code block already)."""
    out = []
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped == "::":
            out.append("")
        elif stripped.endswith("::") and not stripped.endswith(":::") and not stripped.startswith((">>>", "...")):
            out.append(line.rstrip()[:-1])
        else:
            out.append(line)
    return "\n".join(out)


def _is_term(lines: list[str], i: int) -> bool:
    line = lines[i]
    return (
        bool(line.strip())
        and not line[0].isspace()
        and not line.rstrip().endswith(":")
        and not re.match(r"^([*+|-] |\d+\. |>>>|<)", line)
        and (i == 0 or not lines[i - 1].strip() or _is_definition(lines, i - 1))
        and i + 1 < len(lines)
        and lines[i + 1].startswith("    ")
        and bool(lines[i + 1].strip())
    )


def _is_definition(lines: list[str], i: int) -> bool:
    return lines[i].startswith("    ") and bool(lines[i].strip())


def _definition_lists(text: str) -> str:
    """reST definition lists (a term line, its definition indented under it) -> Markdown
    ``def_list`` items; Google sections end in a colon and are left alone."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not _is_term(lines, i):
            out.append(lines[i])
            i += 1
            continue
        j = i + 1
        while j < len(lines) and _is_definition(lines, j):
            j += 1
        if out and out[-1].strip():
            out.append("")
        out.append(lines[i])
        out.append(":   " + lines[i + 1][4:])
        out.extend(lines[i + 2 : j])
        out.append("")
        i = j
    return "\n".join(out)


def _rows(lines: list[str], starts: list[int]) -> list[list[str]]:
    """The cells of a simple table's rows; a line with an empty first cell continues the row."""
    result: list[list[str]] = []
    for line in lines:
        if not line.strip():
            continue
        cells = [line[s:e].strip() for s, e in zip(starts, [*starts[1:], None])]
        if result and not cells[0]:
            for k, cell in enumerate(cells):
                if cell:
                    result[-1][k] = f"{result[-1][k]} {cell}".strip()
        else:
            result.append(cells)
    return result


def _tables(text: str) -> str:
    """reST simple tables (at column 0) -> Markdown tables."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not _BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        borders = [i]
        j = i + 1
        while j < len(lines):
            if _BORDER.match(lines[j]):
                borders.append(j)
                if len(borders) == 3 or j + 1 >= len(lines) or not lines[j + 1].strip():
                    break
            j += 1
        if len(borders) < 2:  # not a table
            out.append(lines[i])
            i += 1
            continue
        starts = [m.start() for m in re.finditer(r"=+", lines[i])]

        if len(borders) == 3:
            head = _rows(lines[borders[0] + 1 : borders[1]], starts)
            body = _rows(lines[borders[1] + 1 : borders[2]], starts)
        else:
            body = _rows(lines[borders[0] + 1 : borders[1]], starts)
            head, body = body[:1], body[1:]
        md = [""]
        for n, row in enumerate(head[:1] + body):
            md.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
            if n == 0:
                md.append("|" + "---|" * len(row))
        out.extend([*md, ""])
        i = borders[-1] + 1
    return "\n".join(out)
