"""Regularizers from plain data: a dict, a YAML file or a JSON file, and back.

::

    rules:
      - type: L2                      # class name of a tr penalty/constraint (case and _ ignored)
        strength: 1.0e-4
        mode: decoupled
      - type: L1
        name: head_l1                 # optional; default lower-case class name, _1, _2, ...
        strength: {type: cosine, value: 1.0e-5, total_steps: 10000}   # a tr.schedules schedule
        mode: prox
        on: {name: "head.*"}          # selector (default: weights)
        exclude: biases               # removed from `on`
      - type: MaxNorm
        max_value: 3.0
        dim: 1
    allow_empty: false                # optional
    impl: auto                        # optional

Selectors:

* a string is a preset: ``all``, ``weights``, ``biases``, ``norms``, ``embeddings``, ``tokens``;
* a list is the union of its items;
* a mapping is the intersection of its keys: ``name`` (glob or list of globs), ``regex``,
  ``modules`` (module type names, looked up in ``torch.nn`` and among the classes of the model's
  own modules — never imported), ``within`` (dotted names of submodules), ``preset``, ``any``
  (list, union), ``all`` (list, intersection), ``not`` (a selector);
* activity rules (``ActivityL1``/``ActivityL2``) select modules: ``on: {modules: [ReLU],
  name: ["encoder.*"]}`` (the keys are united; ``name`` globs over module names).

The other keys of a rule are the arguments of its class (``strength``/``alpha``, ``l1_ratio``,
``dim``, ``mode``, ``lr_coupling``, ...). Strings that read as numbers are accepted where numbers
are (YAML 1.1 reads ``1e-4`` as a string), and a key read as ``true`` is ``on`` (YAML 1.1 reads
``on:`` as a boolean). Unknown keys, unknown types and bad values raise
``ValueError`` with the key's path (``rules[1].strength``). A config never imports code.

Nesting is bounded: a config nested more than ``MAX_DEPTH`` (64) containers deep (a real one
is a few levels: ``rules[0].on.not.name``), or one that contains itself (a YAML alias to its
own anchor), raises ``ValueError`` naming the key path where the limit is crossed. Files are
checked before they are parsed into objects, so a 5000-deep file is a ``ValueError``, never a
``RecursionError``.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import schedules as _schedules
from . import select as _select
from ._rule import Rule

__all__ = [
    "MAX_DEPTH",
    "check_depth",
    "from_config",
    "load_config",
    "parse_selector",
    "rule_types",
    "selector_to_config",
    "to_config",
]

TOP_KEYS = ("rules", "allow_empty", "impl")
SELECTOR_KEYS = ("preset", "name", "regex", "modules", "within", "any", "all", "not")
_ABSTRACT = {"Rule", "Penalty", "Constraint", "FnPenalty"}  # FnPenalty needs code
_NUMERIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_STRENGTH_ARGS = ("strength", "alpha")
MAX_DEPTH = 64  # containers (mappings, lists) from the top of a config to its deepest value


# --------------------------------------------------------------------------- nesting depth


def _key_path(parts: Any) -> str:
    """``("rules", 0, "on")`` -> ``rules[0].on`` (the form every error of this module uses); a
    run of more than 3 equal parts is written once with its count: ``on(.not x 61)``."""
    segs: list[str] = []
    for k in parts:
        if k is True:  # YAML 1.1 reads the key `on:` as true (see the module docstring)
            k = "on"
        if isinstance(k, int) and not isinstance(k, bool):
            segs.append(f"[{k}]")
        else:
            segs.append(f".{k}")
    out, i = "", 0
    while i < len(segs):
        j = i
        while j < len(segs) and segs[j] == segs[i]:
            j += 1
        out += segs[i] * (j - i) if j - i <= 3 else f"({segs[i]} x {j - i})"
        i = j
    return out.removeprefix(".") or "(top level)"


def _too_deep(parts: Any, where: str = "") -> ValueError:
    return ValueError(
        f"{where}{_key_path(parts)}: the config is nested more than {MAX_DEPTH} levels deep "
        "(or contains itself); a regularizer config needs a few levels"
    )


def check_depth(data: Any, where: str = "") -> None:
    """Raise ``ValueError`` naming the key path if ``data`` nests more than ``MAX_DEPTH``
    mappings/lists (a cycle nests without end). Iterative: never a ``RecursionError``; a
    container shared at several places is walked again only where it sits deeper."""
    checked: dict[int, int] = {}  # id -> deepest level at which the container was (being) walked
    todo: list[tuple[Any, tuple]] = [(data, ())]
    while todo:
        node, path = todo.pop()
        if isinstance(node, dict):
            items: Any = node.items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        else:
            continue
        depth = len(path) + 1
        if depth > MAX_DEPTH:
            raise _too_deep(path, where)
        if checked.get(id(node), 0) >= depth:
            continue  # already walked at this level or deeper: nothing new can exceed the bound
        checked[id(node)] = depth
        todo.extend((v, (*path, k)) for k, v in reversed(list(items)))


_JSON_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[{}\[\],]')


def _check_json_depth(text: str, where: str) -> None:
    """The nesting bound on JSON text, before ``json.loads`` (which recurses per level)."""
    stack: list[list[Any]] = []  # per open container: [kind, current key or index]
    want_key = False
    for m in _JSON_TOKEN.finditer(text):
        t = m.group()
        if t[0] == '"':
            if want_key and stack and stack[-1][0] == "{":
                try:
                    stack[-1][1] = json.loads(t)
                except ValueError:
                    stack[-1][1] = t[1:-1]
            want_key = False
        elif t in "{[":
            stack.append([t, "?" if t == "{" else 0])
            if len(stack) > MAX_DEPTH:
                raise _too_deep([f[1] for f in stack[:-1]], where)
            want_key = t == "{"
        elif t in "}]":
            if stack:
                stack.pop()
            want_key = False
        elif stack:  # ","
            if stack[-1][0] == "[":
                stack[-1][1] += 1
            else:
                want_key = True


def _check_yaml_depth(text: str, where: str, yaml: Any) -> None:
    """The nesting bound on YAML text, from its event stream (PyYAML's parser is iterative;
    its composer, used by ``safe_load``, recurses per level)."""
    stack: list[list[Any]] = []  # per open node: [is_mapping, current key or index, children]
    node_events = (yaml.ScalarEvent, yaml.AliasEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, node_events):
            if stack:
                f = stack[-1]
                if not f[0]:
                    f[1] = f[2]
                elif f[2] % 2 == 0:  # a mapping's children alternate key, value
                    f[1] = ev.value if isinstance(ev, yaml.ScalarEvent) else "?"
                f[2] += 1
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack.append([isinstance(ev, yaml.MappingStartEvent), "?", 0])
                if len(stack) > MAX_DEPTH:
                    raise _too_deep([f[1] for f in stack[:-1]], where)
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            stack.pop()


# --------------------------------------------------------------------------- loading


def load_config(cfg: Any) -> Any:
    """A dict as is; a path (``str``/``Path``) ending in ``.yaml``/``.yml`` (``yaml.safe_load``)
    or ``.json`` is read. Either way nesting deeper than ``MAX_DEPTH`` raises ``ValueError``."""
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {str(path)!r}")
        suffix = path.suffix.lower()
        text = path.read_text(encoding="utf-8")
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "reading a YAML config needs PyYAML: pip install 'torch-regularizers[yaml]'"
                ) from None
            try:
                _check_yaml_depth(text, f"{path}: ", yaml)
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(_yaml_error(e, path, text)) from None
            except RecursionError:  # pragma: no cover - _check_yaml_depth comes first
                raise _too_deep((), f"{path}: ") from None
        elif suffix == ".json":
            _check_json_depth(text, f"{path}: ")
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
                ) from None
            except RecursionError:  # pragma: no cover - _check_json_depth comes first
                raise _too_deep((), f"{path}: ") from None
        else:
            raise ValueError(f"{path}: a config file must end in .yaml, .yml or .json")
        check_depth(data, f"{path}: ")  # YAML aliases nest without nesting the text
        return data
    check_depth(cfg)
    return cfg


def _yaml_error(e: Exception, path: Any, text: str) -> str:
    """A PyYAML error on one line: ``file: invalid YAML at line L, column C: problem (context
    at line L', column C'); line L reads '...'`` (PyYAML's own text spans several lines)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem is None or mark is None:
        flat = " ".join(str(e).split()).replace(' in "<unicode string>",', "")
        return f"{path}: invalid YAML: {flat}"
    out = f"{path}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        where = ""
        if cmark is not None and (cmark.line, cmark.column) != (mark.line, mark.column):
            where = f" at line {cmark.line + 1}, column {cmark.column + 1}"
        out += f" ({context}{where})"
    lines = text.splitlines()
    src = lines[mark.line].strip() if mark.line < len(lines) else ""
    if src:
        out += f"; line {mark.line + 1} reads {src if len(src) <= 60 else src[:57] + '...'!r}"
    return out


def _did_you_mean(word: Any, options: Any, norm: Any = None) -> str:
    """`` (did you mean 'strength'?)`` for the option closest to a misspelled ``word``; ``""``
    when nothing is close. ``norm`` compares normalized spellings (rule types)."""
    if not isinstance(word, str) or not word:
        return ""
    by = {(norm(o) if norm else o): o for o in options if isinstance(o, str)}
    m = difflib.get_close_matches(norm(word) if norm else word, list(by), n=1, cutoff=0.6)
    return f" (did you mean {by[m[0]]!r}?)" if m else ""


def _norm(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def rule_types() -> dict[str, type[Rule]]:
    """Normalized name (lower case, no ``_``) -> rule class, for every rule class ``tr`` exports."""
    import torch_regularizers as tr

    out: dict[str, type[Rule]] = {}
    for name in getattr(tr, "__all__", ()):
        obj = getattr(tr, name, None)
        if (
            isinstance(obj, type)
            and issubclass(obj, Rule)
            and obj.__name__ not in _ABSTRACT
            and not obj.__name__.startswith("_")
        ):
            out[_norm(obj.__name__)] = obj
    return out


def _signature(cls: type) -> dict[str, inspect.Parameter]:
    """Constructor arguments; ``**kwargs`` forwarded to a base class adds the base's arguments."""
    out: dict[str, inspect.Parameter] = {}
    for c in cls.__mro__:
        init = c.__dict__.get("__init__")
        if init is None:
            continue
        more = False
        for n, p in inspect.signature(init).parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                more = True
            elif n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL:
                out.setdefault(n, p)
        if not more:
            break
    return out


def _is_module_rule(cls: type) -> bool:
    """Activity rules: ``on=`` selects modules, not parameters."""
    from .activity import ActivityPenalty

    return issubclass(cls, ActivityPenalty)


# --------------------------------------------------------------------------- selectors


def _module_classes(model: nn.Module) -> dict[str, list[type]]:
    """Class name -> classes, for torch.nn and every class in the MRO of the model's modules."""
    out: dict[str, list[type]] = {}
    for m in model.modules():
        for c in type(m).__mro__:
            if c is object or not (isinstance(c, type) and issubclass(c, nn.Module)):
                continue
            lst = out.setdefault(c.__name__, [])
            if c not in lst:
                lst.append(c)
    return out


def _resolve_type(name: Any, model: nn.Module, classes: dict[str, list[type]], path: str) -> list[type]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: a module type is given by its class name (e.g. 'Linear'), got {name!r}")
    short = name
    for prefix in ("torch.nn.", "nn."):
        if short.startswith(prefix):
            short = short[len(prefix) :]
            break
    found = list(classes.get(short, []))
    t = getattr(nn, short, None)
    if isinstance(t, type) and issubclass(t, nn.Module) and t not in found:
        found.append(t)
    if not found:
        known = [*classes, *(n for n, c in vars(nn).items() if isinstance(c, type) and issubclass(c, nn.Module))]
        raise ValueError(
            f"{path}: unknown module type {name!r}{_did_you_mean(short, known)}: not in torch.nn "
            f"and no module of {type(model).__name__} has a class of that name"
        )
    return found


def _strs(val: Any, path: str) -> list[str]:
    vals = [val] if isinstance(val, str) else val
    if not isinstance(vals, list) or not vals or not all(isinstance(v, str) and v for v in vals):
        raise ValueError(f"{path}: expected a string or a non-empty list of strings, got {val!r}")
    return vals


def _submodules(model: nn.Module) -> dict[str, nn.Module]:
    """Dotted name (wrapper prefixes removed, as selectors name parameters) -> module."""
    out: dict[str, nn.Module] = {}
    for prefix, mod, _ in _select._walk(model):
        out.setdefault(prefix.rstrip("."), mod)
    return out


def parse_selector(spec: Any, model: nn.Module, path: str = "on") -> _select.Selector:
    """A selector from its config form (see the module docstring); errors name ``path``."""
    classes: dict[str, list[type]] | None = None

    def parse(s: Any, p: str) -> _select.Selector:
        nonlocal classes
        if isinstance(s, str):
            sel = _select.PRESETS.get(s)
            if sel is None:
                raise ValueError(
                    f"{p}: unknown selector preset {s!r}{_did_you_mean(s, _select.PRESETS)}; "
                    f"presets are {sorted(_select.PRESETS)} "
                    "(use {name: 'glob'} or {regex: '...'} to select by name)"
                )
            return sel
        if isinstance(s, list):
            if not s:
                raise ValueError(f"{p}: an empty list selects nothing")
            parts = [parse(x, f"{p}[{i}]") for i, x in enumerate(s)]
            return _fold(parts, "|")
        if isinstance(s, dict):
            if not s:
                raise ValueError(f"{p}: an empty mapping is not a selector")
            parts = []
            for key, val in s.items():
                kp = f"{p}.{key}"
                if key == "preset":
                    if not isinstance(val, str):
                        raise ValueError(f"{kp}: expected a preset name, got {val!r}")
                    parts.append(parse(val, kp))
                elif key == "name":
                    parts.append(_select.name(*_strs(val, kp)))
                elif key == "regex":
                    pats = _strs(val, kp)
                    for i, pat in enumerate(pats):
                        try:
                            re.compile(pat)
                        except re.error as e:
                            raise ValueError(f"{kp}{'' if isinstance(val, str) else f'[{i}]'}: invalid regex {pat!r}: {e}") from None
                    parts.append(_select.regex(*pats))
                elif key == "modules":
                    if classes is None:
                        classes = _module_classes(model)
                    names = _strs(val, kp)
                    types: list[type] = []
                    for i, n in enumerate(names):
                        ip = kp if isinstance(val, str) else f"{kp}[{i}]"
                        types += [t for t in _resolve_type(n, model, classes, ip) if t not in types]
                    parts.append(_select.modules(*types))
                elif key == "within":
                    subs = _submodules(model)
                    names = _strs(val, kp)
                    mods = []
                    for i, n in enumerate(names):
                        if n not in subs:
                            ip = kp if isinstance(val, str) else f"{kp}[{i}]"
                            raise ValueError(f"{ip}: {type(model).__name__} has no submodule {n!r}")
                        mods.append(subs[n])
                    parts.append(_select.within(*mods))
                elif key in ("any", "all"):
                    if not isinstance(val, list) or not val:
                        raise ValueError(f"{kp}: expected a non-empty list of selectors, got {val!r}")
                    subs_ = [parse(x, f"{kp}[{i}]") for i, x in enumerate(val)]
                    parts.append(_fold(subs_, "|" if key == "any" else "&"))
                elif key == "not":
                    parts.append(~parse(val, kp))
                else:
                    raise ValueError(
                        f"{kp}: unknown selector key{_did_you_mean(key, SELECTOR_KEYS)}; "
                        f"expected one of {list(SELECTOR_KEYS)}"
                    )
            return _fold(parts, "&")
        raise ValueError(f"{p}: a selector is a preset name, a list or a mapping, got {s!r}")

    return parse(spec, path)


def parse_module_selector(spec: Any, model: nn.Module, path: str = "on") -> list:
    """The ``on=`` of an activity rule: a mapping whose keys are united (``modules``: type
    names, ``name``: globs over module names), or a list of them."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"{path}: an empty list selects no module")
        return [x for i, s in enumerate(spec) for x in parse_module_selector(s, model, f"{path}[{i}]")]
    if not isinstance(spec, dict) or not spec:
        raise ValueError(
            f"{path}: activity rules select modules: a mapping with keys modules, name; got {spec!r}"
        )
    out: list = []
    for key, val in spec.items():
        kp = f"{path}.{key}"
        if key == "modules":
            classes = _module_classes(model)
            for i, n in enumerate(_strs(val, kp)):
                ip = kp if isinstance(val, str) else f"{kp}[{i}]"
                out += [t for t in _resolve_type(n, model, classes, ip) if t not in out]
        elif key == "name":
            out += _strs(val, kp)
        else:
            raise ValueError(
                f"{kp}: unknown key{_did_you_mean(key, ('modules', 'name'))}; "
                "an activity rule's on= takes modules, name"
            )
    return out


def module_selector_to_config(sel: Any, model: nn.Module | None, path: str) -> dict[str, Any]:
    if getattr(sel, "preds", None):
        raise ValueError(f"{path}: a module predicate fn(name, module) cannot be written to a config")
    out: dict[str, Any] = {}
    if sel.types:
        out["modules"] = [t.__name__ for t in sel.types]
    names = list(sel.patterns)
    if sel.instances:
        by_id = {id(m): n for n, m in reversed(list(_submodules(model).items()))} if model is not None else {}
        for m in sel.instances:
            if id(m) not in by_id:
                raise ValueError(f"{path}: module {type(m).__name__} is not a submodule of the model")
            names.append(by_id[id(m)])
    if names:
        out["name"] = names
    return out


def _fold(parts: list[_select.Selector], op: str) -> _select.Selector:
    out = parts[0]
    for q in parts[1:]:
        out = out | q if op == "|" else out & q
    return out


def selector_to_config(sel: _select.Selector, model: nn.Module | None = None, path: str = "on") -> Any:
    """The config form of a selector; ``ValueError`` for ``where(...)`` and other predicates."""
    if isinstance(sel, _select._Preset):
        return sel.name
    if isinstance(sel, _select._Name):
        return {"name": sel.patterns[0] if len(sel.patterns) == 1 else list(sel.patterns)}
    if isinstance(sel, _select._Regex):
        return {"regex": sel.patterns[0] if len(sel.patterns) == 1 else list(sel.patterns)}
    if isinstance(sel, _select._Modules):
        names = [t.__name__ for t in sel.types]
        return {"modules": names[0] if len(names) == 1 else names}
    if isinstance(sel, _select._Within):
        if model is None:
            raise ValueError(f"{path}: within(...) needs the model to be written to a config")
        by_id = {id(m): n for n, m in reversed(list(_submodules(model).items()))}
        names = []
        for m in sel.mods:
            if id(m) not in by_id:
                raise ValueError(f"{path}: within({type(m).__name__}) is not a submodule of the model")
            names.append(by_id[id(m)])
        return {"within": names[0] if len(names) == 1 else names}
    if isinstance(sel, _select._Combine):
        a = selector_to_config(sel.a, model, path)
        b = selector_to_config(sel.b, model, path)
        if sel.op == "|":
            return (a if isinstance(a, list) else [a]) + (b if isinstance(b, list) else [b])
        if sel.op == "&":
            return {"all": [a, b]}
        return {"all": [a, {"not": b}]}
    if isinstance(sel, _select._Not):
        return {"not": selector_to_config(sel.a, model, path)}
    raise ValueError(
        f"{path}: selector {sel!r} cannot be written to a config (only presets, name, regex, "
        "modules, within and their combinations can)"
    )


# --------------------------------------------------------------------------- rules


def _coerce(val: Any) -> Any:
    if isinstance(val, str) and _NUMERIC.match(val.strip()):
        return float(val)
    if isinstance(val, list):
        return tuple(_coerce(v) for v in val)
    return val


def _parse_strength(val: Any, path: str) -> Any:
    if isinstance(val, dict):
        return _schedules.from_config(val, path)
    val = _coerce(val)
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise ValueError(f"{path}: expected a number >= 0 or a schedule mapping, got {val!r}")
    if val != val or val < 0 or val in (float("inf"), float("-inf")):
        raise ValueError(f"{path}: must be a finite number >= 0, got {val!r}")
    return float(val)


def _parse_rule(spec: Any, model: nn.Module, path: str, types: dict[str, type[Rule]]) -> Rule:
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a rule is a mapping with a 'type' key, got {spec!r}")
    kind = spec.get("type")
    if not isinstance(kind, str) or _norm(kind) not in types:
        names = sorted(t.__name__ for t in types.values())
        raise ValueError(
            f"{path}.type: unknown rule type {kind!r}{_did_you_mean(kind, names, _norm)}; "
            f"expected one of {names}"
        )
    cls = types[_norm(kind)]
    sig = _signature(cls)
    if True in spec:  # YAML 1.1 (PyYAML) reads the key `on:` as the boolean true
        if "on" in spec:
            raise ValueError(f"{path}.on: given twice")
        spec = {("on" if k is True else k): v for k, v in spec.items()}
    kwargs: dict[str, Any] = {}
    for key, val in spec.items():
        kp = f"{path}.{key}"
        if key in ("type", "exclude"):
            continue
        if key == "on" and "on" in sig:
            if _is_module_rule(cls):
                kwargs["on"] = parse_module_selector(val, model, kp)
            else:
                kwargs["on"] = parse_selector(val, model, kp)
        elif key not in sig:
            allowed = ["type", *sig, "exclude"] if "on" in sig else ["type", *sig]
            raise ValueError(
                f"{kp}: unknown key for {cls.__name__}{_did_you_mean(key, allowed)}; "
                f"expected one of {allowed}"
            )
        elif key in _STRENGTH_ARGS:
            kwargs[key] = _parse_strength(val, kp)
        elif key == "name":
            kwargs[key] = val
        else:
            kwargs[key] = _coerce(val)
    if "exclude" in spec:
        if "on" not in sig or _is_module_rule(cls):
            raise ValueError(f"{path}.exclude: {cls.__name__} takes no on= selector")
        base = kwargs.get("on", _select.weights)
        kwargs["on"] = base - parse_selector(spec["exclude"], model, f"{path}.exclude")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e)
        bad = next((k for k in kwargs if re.search(rf"\b{re.escape(k)}\b", msg)), None)
        missing = re.search(r"missing \d+ required positional argument[s]?: '(\w+)'", msg)
        if missing:
            raise ValueError(f"{path}.{missing.group(1)}: required by {cls.__name__}") from None
        raise ValueError(f"{path}{'.' + bad if bad else ''}: {msg}") from None


def from_config(model: nn.Module, cfg: Any, cls: type | None = None, **overrides: Any):
    """Build a :class:`~torch_regularizers.Regularizer` on ``model`` from a config (dict, list of
    rules, or a ``.yaml``/``.yml``/``.json`` path). ``overrides`` (``allow_empty=``, ``impl=``)
    take precedence over the config's."""
    from .regularizer import Regularizer

    cls = cls or Regularizer
    data = load_config(cfg)
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, dict):
        raise ValueError(f"a regularizer config is a mapping with a 'rules' list, got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise ValueError(
                f"{key}: unknown key{_did_you_mean(key, TOP_KEYS)}; expected one of {list(TOP_KEYS)}"
            )
    rules_spec = data.get("rules")
    if not isinstance(rules_spec, list):
        raise ValueError(f"rules: expected a list of rules, got {rules_spec!r}")
    kw: dict[str, Any] = {}
    if "allow_empty" in data:
        if not isinstance(data["allow_empty"], bool):
            raise ValueError(f"allow_empty: expected true or false, got {data['allow_empty']!r}")
        kw["allow_empty"] = data["allow_empty"]
    if "impl" in data:
        kw["impl"] = data["impl"]
    kw.update(overrides)
    types = rule_types()
    rules = [_parse_rule(r, model, f"rules[{i}]", types) for i, r in enumerate(rules_spec)]
    if not kw.get("allow_empty", False):
        idx = _select.index(model)
        for i, r in enumerate(rules):
            on = getattr(r, "on", None)
            if _is_module_rule(type(r)):
                continue
            if isinstance(on, _select.Selector) and not on.match(idx):
                raise ValueError(
                    f"rules[{i}].on: {type(r).__name__} (on={on!r}) selects no parameter of "
                    f"{type(model).__name__}; check the selector, or set allow_empty: true"
                )
    try:
        return cls(model, rules, **kw)
    except ValueError as e:
        if "impl=" in str(e):
            raise ValueError(f"impl: {e}") from None
        raise


# --------------------------------------------------------------------------- writing


def _plain(val: Any, path: str) -> Any:
    if val is None or isinstance(val, (bool, int, float, str)):
        return val
    if isinstance(val, _schedules.Schedule):
        return val.to_config()
    if isinstance(val, (tuple, list, torch.Size)):
        return [_plain(v, path) for v in val]
    if isinstance(val, torch.Tensor) or (
        isinstance(val, dict) and any(isinstance(v, torch.Tensor) for v in val.values())
    ):
        raise ValueError(f"{path}: tensors cannot be written to a config (state_dict() keeps them)")
    if callable(val):
        raise ValueError(
            f"{path}: a Python callable cannot be written to a config; use a tr.schedules schedule"
        )
    raise ValueError(f"{path}: {type(val).__name__} cannot be written to a config")


def rule_to_config(rule: Rule, name: str, model: nn.Module | None, path: str) -> dict[str, Any]:
    """The config form of one rule (its class's arguments that differ from the defaults)."""
    cls = type(rule)
    if _norm(cls.__name__) not in rule_types():
        raise ValueError(f"{path}: {cls.__name__} is not an exported rule type and cannot be written to a config")
    out: dict[str, Any] = {"type": cls.__name__, "name": name}
    for pname, p in _signature(cls).items():
        kp = f"{path}.{pname}"
        if pname == "name":
            continue
        if pname in _STRENGTH_ARGS:
            if getattr(rule, "timescale", None) is None:  # a timescale rule writes timescale
                out[pname] = _plain(rule.strength, kp)
            continue
        if pname == "on":
            on = rule.on
            if _is_module_rule(cls):
                out["on"] = module_selector_to_config(on, model, kp)
            elif isinstance(on, _select._Combine) and on.op == "-":
                out["on"] = selector_to_config(on.a, model, kp)
                out["exclude"] = selector_to_config(on.b, model, f"{path}.exclude")
            elif on is not _select.weights:
                out["on"] = selector_to_config(on, model, kp)
            continue
        if hasattr(rule, pname):
            val = getattr(rule, pname)
        elif hasattr(rule, "_" + pname):
            val = getattr(rule, "_" + pname)
        else:
            raise ValueError(f"{kp}: {cls.__name__} does not expose its argument {pname!r}")
        if pname != "mode" and p.default is not inspect.Parameter.empty:
            try:
                if val == p.default or (isinstance(val, tuple) and list(val) == p.default):
                    continue
            except (TypeError, RuntimeError):
                pass
        out[pname] = _plain(val, kp)
    return out


def to_config(reg: Any) -> dict[str, Any]:
    """The config of a Regularizer: ``from_config(model, to_config(reg))`` rebuilds it."""
    rules = [
        rule_to_config(b.rule, b.name, reg.model, f"rules[{i}]") for i, b in enumerate(reg._bindings)
    ]
    out: dict[str, Any] = {"rules": rules}
    if any(not b.infos and not _is_module_rule(type(b.rule)) for b in reg._bindings):
        out["allow_empty"] = True
    if reg.impl != "foreach":
        out["impl"] = reg.impl
    return out
