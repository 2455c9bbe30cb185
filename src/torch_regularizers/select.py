"""Selectors: which parameters a rule applies to.

A selector is a small composable predicate over a model's parameters::

    tr.select.weights - tr.select.name("head.*")
    tr.select.modules(nn.Linear, nn.Conv2d) | tr.select.within(model.decoder)

``sel.resolve(model)`` returns ``[(name, param), ...]`` in ``named_parameters()``
order, each parameter once. Names are the bare model's names: the prefixes that
real wrappers add (DDP/``DataParallel`` ``module.``, ``torch.compile``'s
``_orig_mod.``, FSDP1's ``_fsdp_wrapped_module.``, activation-checkpoint wrappers)
are removed *by wrapper type*, so a child that merely happens to be called
``module`` keeps its name. A tied parameter is one parameter, reported under its
first name; a selector matching any of its names selects it.

Presets (attributes, not calls): ``all``, ``biases``, ``norms``, ``embeddings``,
``tokens``, ``weights`` (= ndim ≥ 2 minus ``embeddings | tokens | norms``).

A module's ``no_weight_decay()`` (timm's convention) lists ``fnmatch`` patterns relative to
that module (``{'pos_embed.*', 'cls_token'}``); a ``no_weight_decay()`` that fails or returns
nothing usable is ignored with one ``UserWarning`` naming the module.

Parameters a selector cannot judge raise ``ValueError`` naming them: an uninitialized
parameter of a lazy module (``nn.LazyLinear`` before its first forward) when the index is
built, and a complex-valued parameter when a rule selects it (:func:`check_selectable`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = [
    "ParamInfo",
    "Selector",
    "all",
    "biases",
    "check_selectable",
    "embeddings",
    "index",
    "modules",
    "name",
    "norms",
    "regex",
    "tokens",
    "weights",
    "where",
    "within",
]

# --------------------------------------------------------------------------- model walk

# (defining module, class name) -> attribute holding the wrapped module.
_WRAPPERS: dict[tuple[str, str], str] = {
    ("torch.nn.parallel.distributed", "DistributedDataParallel"): "module",
    ("torch.nn.parallel.data_parallel", "DataParallel"): "module",
    ("torch._dynamo.eval_frame", "OptimizedModule"): "_orig_mod",
    (
        "torch.distributed.fsdp.fully_sharded_data_parallel",
        "FullyShardedDataParallel",
    ): "_fsdp_wrapped_module",
    (
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
        "CheckpointWrapper",
    ): "_checkpoint_wrapped_module",
    (
        "torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
        "OffloadWrapper",
    ): "_checkpoint_wrapped_module",
}


def _wrapped_attr(module: nn.Module) -> str | None:
    """The attribute of ``module`` holding the model it wraps, if it is a known wrapper."""
    for cls in type(module).__mro__:
        attr = _WRAPPERS.get((cls.__module__, cls.__name__))
        if attr is not None:
            return attr
    return None


def _is_parametrization_list(module: nn.Module) -> bool:
    return type(module).__name__ == "ParametrizationList" and type(module).__module__.startswith(
        "torch.nn.utils.parametrize"
    )


def _walk(
    module: nn.Module, prefix: str = "", parents: tuple[nn.Module, ...] = ()
) -> Iterator[tuple[str, nn.Module, tuple[nn.Module, ...]]]:
    """Pre-order walk yielding (prefix, module, parents); wrapper levels are transparent.

    Shared submodules are visited under every name (so tied parameters get aliases).
    """
    yield prefix, module, parents
    skip = _wrapped_attr(module)
    for child_name, child in module._modules.items():
        if child is None:
            continue
        child_prefix = prefix if child_name == skip else f"{prefix}{child_name}."
        yield from _walk(child, child_prefix, (*parents, module))


@dataclass
class ParamInfo:
    """One unique parameter of a model, as selectors see it."""

    name: str
    param: nn.Parameter
    module: nn.Module  # owning module (the parametrized module for parametrizations)
    aliases: list[str] = field(default_factory=list)  # other names of a tied parameter
    owners: list[nn.Module] = field(default_factory=list)
    base: str = ""  # last name part; for a parametrization's `original`, the parametrized name
    no_weight_decay: bool = False  # listed by a module's `no_weight_decay()`

    @property
    def names(self) -> list[str]:
        return [self.name, *self.aliases]


def _module_label(prefix: str, mod: nn.Module) -> str:
    return f"{prefix.rstrip('.') or '<model>'} ({type(mod).__name__})"


def _no_weight_decay_patterns(prefix: str, mod: nn.Module) -> list[str] | None:
    """The patterns ``mod.no_weight_decay()`` declares, or None (with one ``UserWarning``
    naming the module) when it needs arguments, raises, or returns nothing usable."""
    where = _module_label(prefix, mod)
    try:
        out = mod.no_weight_decay()
    except Exception as e:  # needs arguments, or fails: ignore it, never crash a Regularizer
        reason = f"calling it raised {type(e).__name__}: {e}"
    else:
        if isinstance(out, str):
            return [out]
        if isinstance(out, Iterable) and not isinstance(out, (bytes, torch.Tensor)):
            try:
                items = list(out)
            except Exception as e:
                reason = f"iterating its result raised {type(e).__name__}: {e}"
            else:
                good = [x for x in items if isinstance(x, str)]
                bad = [x for x in items if not isinstance(x, str)]
                if not bad:
                    return good
                reason = f"it returned non-string entries {bad[:3]!r}"
                if good:  # keep the usable names, say which entries were dropped
                    reason += f" (they are dropped; its names {good[:3]!r} are used)"
                    _warn_nwd(where, reason)
                    return good
        else:
            reason = f"it returned {type(out).__name__} {out!r:.60}, not an iterable of names"
    _warn_nwd(where, reason + "; it is ignored")
    return None


def _user_stacklevel() -> int:
    """``stacklevel`` of the first caller outside this package (for ``warnings.warn`` called
    from the function that calls this)."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg + os.sep):
        f, level = f.f_back, level + 1
    return level


def _warn_nwd(where: str, reason: str) -> None:
    warnings.warn(
        f"torch_regularizers: no_weight_decay() of module {where}: {reason}. It should return "
        "names or fnmatch patterns of parameters, relative to the module "
        "(e.g. {'pos_embed', 'cls_token', 'pos_embed.*'})",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


def _nwd_match(rel: str, patterns: Sequence[str]) -> bool:
    """``rel`` (a name relative to the declaring module) matches a ``no_weight_decay()``
    entry: an ``fnmatch`` pattern as timm applies it (an exact name is the pattern without
    wildcards), or a prefix ending at a dot (``"gate."``: everything under ``gate``)."""
    return any(
        rel == pat
        or (pat.endswith(".") and rel.startswith(pat))
        or fnmatch.fnmatchcase(rel, pat)
        for pat in patterns
    )


def _check_lazy(params: list[ParamInfo]) -> None:
    lazy = [i for i in params if isinstance(i.param, nn.parameter.UninitializedParameter)]
    if not lazy:
        return
    by_mod: dict[int, tuple[nn.Module, list[str]]] = {}
    for i in lazy:
        by_mod.setdefault(id(i.module), (i.module, []))[1].append(i.name)
    what = "; ".join(
        f"module {names[0].rpartition('.')[0] or '<model>'} ({type(m).__name__}): "
        + ", ".join(names)
        for m, names in by_mod.values()
    )
    raise ValueError(
        f"torch_regularizers: lazy module parameter(s) not initialized yet: {what}. "
        "Their shapes are unknown until the module runs: run one forward pass "
        "(e.g. model(example_batch)) before building the Regularizer or resolving selectors"
    )


class ParamIndex:
    """All unique parameters of a model with names, owners and aliases (built once).

    Raises ``ValueError`` naming them if some parameters are uninitialized (lazy modules
    before their first forward pass).
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.params: list[ParamInfo] = []
        by_id: dict[int, ParamInfo] = {}
        nwd: list[tuple[str, list[str]]] = []
        nwd_seen: dict[int, list[str] | None] = {}
        for prefix, mod, parents in _walk(model):
            fn = getattr(mod, "no_weight_decay", None)
            if callable(fn) and not _is_parametrization_list(mod):
                if id(mod) not in nwd_seen:  # a shared module is asked (and warns) once
                    nwd_seen[id(mod)] = _no_weight_decay_patterns(prefix, mod)
                pats = nwd_seen[id(mod)]
                if pats:
                    nwd.append((prefix, pats))
            owner, base_override = mod, None
            if _is_parametrization_list(mod) and len(parents) >= 2:
                owner = parents[-2]
                base_override = prefix.rstrip(".").rsplit(".", 1)[-1]
            for pname, p in mod._parameters.items():
                if p is None:
                    continue
                full = prefix + pname
                info = by_id.get(id(p))
                if info is None:
                    info = ParamInfo(full, p, owner, base=base_override or pname)
                    info.owners.append(owner)
                    by_id[id(p)] = info
                    self.params.append(info)
                else:
                    if full not in info.names:
                        info.aliases.append(full)
                    if owner not in info.owners:
                        info.owners.append(owner)
        _check_lazy(self.params)
        for prefix, patterns in nwd:
            for info in self.params:
                if info.no_weight_decay:
                    continue
                for full in info.names:
                    if full.startswith(prefix) and _nwd_match(full[len(prefix) :], patterns):
                        info.no_weight_decay = True
                        break
        self.by_id = by_id

    def info(self, p: torch.Tensor) -> ParamInfo | None:
        return self.by_id.get(id(p))


def check_selectable(rule_name: str, infos: Sequence[ParamInfo]) -> None:
    """Raise ``ValueError`` naming the parameters a rule cannot act on, among those it selects.

    ``infos`` are the :class:`ParamInfo` a rule named ``rule_name`` selects (``rule.on.match``
    of a :class:`ParamIndex`). Complex-valued parameters are refused: the rules' math is
    written for real tensors (L2 would report Σθ² rather than ½λΣ|θ|², and L1's prox fails at
    the first step), so they must be left out of the selection (``on=... - tr.select.name(...)``)
    or regularized on a real view. Uninitialized (lazy) parameters are refused too (the index
    already refuses them; this covers infos built by hand). A model that merely *contains*
    such parameters, unselected, is fine.
    """
    infos = list(infos)
    _check_lazy(infos)
    bad = [
        f"{i.name} ({str(i.param.dtype).replace('torch.', '')}, shape {tuple(i.param.shape)})"
        for i in infos
        if i.param.is_complex()
    ]
    if bad:
        raise ValueError(
            f"rule {rule_name!r} selects complex-valued parameter(s) {', '.join(bad)}; "
            "torch_regularizers rules act on real parameters only. Leave them out of the "
            "rule's on= selector (e.g. on=tr.select.weights - tr.select.name('<their names>')), "
            "or regularize torch.view_as_real(p) with your own loss term"
        )


def index(model: nn.Module) -> ParamIndex:
    """Build the :class:`ParamIndex` of ``model`` (names, owners, aliases)."""
    return model if isinstance(model, ParamIndex) else ParamIndex(model)


# --------------------------------------------------------------------------- selectors


class Selector:
    """A set of parameters of a model, defined by a predicate. Compose with ``| & - ~``."""

    def match(self, idx: ParamIndex) -> set[int]:
        """Positions (into ``idx.params``) of the selected parameters."""
        return {i for i, info in enumerate(idx.params) if self._test(info)}

    def _test(self, info: ParamInfo) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def resolve(self, model: nn.Module | ParamIndex) -> list[tuple[str, nn.Parameter]]:
        """``[(name, param)]`` of the selected parameters, in ``named_parameters()`` order."""
        idx = index(model)
        hit = self.match(idx)
        return [(info.name, info.param) for i, info in enumerate(idx.params) if i in hit]

    def __or__(self, other: Selector) -> Selector:
        return _Combine("|", self, _check(other))

    def __and__(self, other: Selector) -> Selector:
        return _Combine("&", self, _check(other))

    def __sub__(self, other: Selector) -> Selector:
        return _Combine("-", self, _check(other))

    def __invert__(self) -> Selector:
        return _Not(self)


def _check(other: object) -> Selector:
    if not isinstance(other, Selector):
        raise TypeError(f"cannot combine a selector with {type(other).__name__}")
    return other


class _Combine(Selector):
    def __init__(self, op: str, a: Selector, b: Selector) -> None:
        self.op, self.a, self.b = op, a, b

    def match(self, idx):
        a, b = self.a.match(idx), self.b.match(idx)
        return a | b if self.op == "|" else a & b if self.op == "&" else a - b

    def __repr__(self):
        return f"({self.a!r} {self.op} {self.b!r})"


class _Not(Selector):
    def __init__(self, a: Selector) -> None:
        self.a = a

    def match(self, idx):
        return set(range(len(idx.params))) - self.a.match(idx)

    def __repr__(self):
        return f"~{self.a!r}"


def _strings(arg: str, values: tuple) -> tuple[str, ...]:
    if not values:
        raise ValueError(f"tr.select.{arg}() needs at least one pattern")
    for v in values:
        if not isinstance(v, str):
            raise TypeError(f"tr.select.{arg}(): patterns must be str, got {type(v).__name__}")
    return values


class _Name(Selector):
    def __init__(self, *patterns: str) -> None:
        self.patterns = _strings("name", patterns)

    def _test(self, info):
        return any(fnmatch.fnmatchcase(n, pat) for n in info.names for pat in self.patterns)

    def __repr__(self):
        return f"name({', '.join(map(repr, self.patterns))})"


class _Regex(Selector):
    def __init__(self, *patterns: str) -> None:
        self.patterns = _strings("regex", patterns)
        try:
            self._compiled = [re.compile(p) for p in self.patterns]
        except re.error as e:
            raise ValueError(f"tr.select.regex(): invalid pattern: {e}") from None

    def _test(self, info):
        return any(r.search(n) for n in info.names for r in self._compiled)

    def __repr__(self):
        return f"regex({', '.join(map(repr, self.patterns))})"


class _Modules(Selector):
    def __init__(self, *types: type) -> None:
        if not types:
            raise ValueError("tr.select.modules() needs at least one module type")
        for t in types:
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise TypeError(f"tr.select.modules(): expected nn.Module subclasses, got {t!r}")
        self.types = types

    def _test(self, info):
        return any(isinstance(m, self.types) for m in info.owners)

    def __repr__(self):
        return f"modules({', '.join(t.__name__ for t in self.types)})"


class _Within(Selector):
    def __init__(self, *mods: nn.Module) -> None:
        if not mods:
            raise ValueError("tr.select.within() needs at least one module")
        for m in mods:
            if not isinstance(m, nn.Module):
                raise TypeError(f"tr.select.within(): expected module instances, got {type(m).__name__}")
        self.mods = mods

    def match(self, idx):
        ids = {id(p) for m in self.mods for p in m.parameters()}
        return {i for i, info in enumerate(idx.params) if id(info.param) in ids}

    def __repr__(self):
        return f"within({', '.join(type(m).__name__ for m in self.mods)})"


class _Where(Selector):
    def __init__(self, fn: Callable[[str, nn.Parameter, nn.Module], bool]) -> None:
        if not callable(fn):
            raise TypeError("tr.select.where() needs a callable fn(name, param, module) -> bool")
        self.fn = fn

    def _test(self, info):
        return bool(self.fn(info.name, info.param, info.module))

    def __repr__(self):
        return f"where({getattr(self.fn, '__name__', 'fn')})"


class _Preset(Selector):
    def __init__(self, name: str, test: Callable[[ParamInfo], bool]) -> None:
        self.name, self._fn = name, test

    def _test(self, info):
        return self._fn(info)

    def __repr__(self):
        return self.name


def name(*patterns: str) -> Selector:
    """Parameters whose full name matches any ``fnmatch`` glob (``*`` also crosses dots)."""
    return _Name(*patterns)


def regex(*patterns: str) -> Selector:
    """Parameters whose full name matches any regular expression (``re.search``)."""
    return _Regex(*patterns)


def modules(*types: type) -> Selector:
    """Parameters owned directly by a module of one of these types.

    A parametrization's ``original*`` belongs to the module it parametrizes.
    """
    return _Modules(*types)


def within(*mods: nn.Module) -> Selector:
    """Every parameter of these module instances (recursively)."""
    return _Within(*mods)


def where(fn: Callable[[str, nn.Parameter, nn.Module], bool]) -> Selector:
    """Parameters for which ``fn(name, param, owning_module)`` is true."""
    return _Where(fn)


# --------------------------------------------------------------------------- presets

_TORCH_NORMS: tuple[type, ...] = tuple(
    t
    for t in (
        getattr(nn.modules.batchnorm, "_BatchNorm", None),
        getattr(nn.modules.instancenorm, "_InstanceNorm", None),
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
        nn.CrossMapLRN2d,
    )
    if t is not None
)
#: "Norm" as a CamelCase word of a class name (``LlamaRMSNorm``, ``MambaRMSNormGated``,
#: ``FrozenBatchNorm2d``, ``NemotronLayerNorm1P``, timm's ``BatchNormAct2d``), not the start
#: of a longer word (``Normal``, ``Normalizer``), and not a word in the middle of the name of a
#: block that merely contains a norm (``Wav2Vec2GroupNormConvLayer``, ``RTDetrConvNormLayer``,
#: ``RobertaPreLayerNormModel``, timm's ``NormMlpClassifierHead``): those own no norm gains.
_NORM_NAME = re.compile(
    r"Norm(?![a-z])(?!(?:Conv|Layer|Model|For|Pre|PreTrained|Head|LM|Lm|Mlp|MLP|Embeddings?|Encoder|"
    r"Decoder|Attention|Cross|Self|Intermediate|Output|Pooler|Classifier|Classification|Block|"
    r"Config|Linear|Stem|Net|Backbone|Projection|Proj|Adapter)(?![a-z]))"
)
_TOKEN_NAMES = {"position_embedding", "position_embeddings", "logit_scale"}
#: relative position tables (Swin, BEiT, MaxViT, timm ``rel_pos_bias``), by how the name ends
_REL_POS_SUFFIXES = ("relative_position_bias_table", "relative_position_bias", "rel_pos_bias")
#: continuous relative position bias MLPs (SwinV2): every parameter under a module so named
_REL_POS_MODULES = {"cpb_mlp", "continuous_position_bias_mlp"}


def _is_norm_module(m: nn.Module) -> bool:
    return isinstance(m, _TORCH_NORMS) or any(
        _NORM_NAME.search(c.__name__) for c in type(m).__mro__ if c is not nn.Module
    )


def _is_bias(info: ParamInfo) -> bool:
    b = info.base
    return b == "bias" or b.startswith("bias_") or b.endswith("_bias")


def _is_token(info: ParamInfo) -> bool:
    b = info.base
    return (
        info.no_weight_decay
        or b.endswith(("_token", "_tokens"))
        or b in _TOKEN_NAMES
        or b.endswith("_logit_scale")
        or b.startswith("pos_embed")
        or b.endswith(_REL_POS_SUFFIXES)
        or any(not _REL_POS_MODULES.isdisjoint(n.split(".")[:-1]) for n in info.names)
    )


def _is_embedding(info: ParamInfo) -> bool:
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in info.owners)


def _is_norm(info: ParamInfo) -> bool:
    return any(_is_norm_module(m) for m in info.owners)


all = _Preset("all", lambda info: True)
biases = _Preset("biases", _is_bias)
norms = _Preset("norms", _is_norm)
embeddings = _Preset("embeddings", _is_embedding)
tokens = _Preset("tokens", _is_token)
weights = _Preset(
    "weights",
    lambda info: info.param.dim() >= 2
    and not (_is_embedding(info) or _is_token(info) or _is_norm(info)),
)

PRESETS: dict[str, Selector] = {
    s.name: s for s in (all, biases, norms, embeddings, tokens, weights)
}
