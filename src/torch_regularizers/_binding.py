"""Binding rules to a model's parameters (docs/design.md §2, "Binding").

A :class:`Binding` is one rule of one :class:`~torch_regularizers.Regularizer` with the
parameters its selector chose. Binding happens at construction and again whenever the
model's parameters are replaced (meta-device init + ``to_empty``,
``load_state_dict(assign=True)``, ``module.weight = nn.Parameter(...)``): the selection is
by name, so the rules follow the new tensors (:class:`ModelWatch` tells when, cheaply
enough to ask on every manual ``apply_*`` call).

A rule instance belongs to the first Regularizer built with it; passing the same instance
to another live Regularizer binds a shallow copy there (its own parameters and L2-SP
references), so building a second regularizer never changes the first.
"""

from __future__ import annotations

import copy
import operator
import weakref
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

from torch import nn

from . import distributed as _dist
from . import select as _select
from ._rule import Rule
from .activity import ActivityPenalty

__all__ = ["Binding", "ModelWatch", "bind_rules", "check_prox_conflicts", "fingerprint", "normalize_rules"]


@dataclass
class Binding:
    """A rule bound to a model: its unique name and its selected parameters."""

    rule: Rule
    name: str
    infos: list[_select.ParamInfo]

    @property
    def params(self) -> list[nn.Parameter]:
        return [i.param for i in self.infos]


def normalize_rules(rules: Any, allow_empty: bool) -> list[Rule]:
    """``rules`` as a list of rule instances, or a ``TypeError``/``ValueError`` saying what
    was passed instead (a class, a number, nothing)."""
    if isinstance(rules, Rule):
        return [rules]
    if isinstance(rules, type) and issubclass(rules, Rule):
        raise TypeError(
            f"rules: got the class tr.{rules.__name__}, not an instance; "
            f"write tr.{rules.__name__}(strength, ...) (e.g. tr.L2(1e-4))"
        )
    if isinstance(rules, (str, bytes, dict)) or not isinstance(rules, Iterable):
        raise TypeError(
            "rules must be a penalty or constraint (e.g. tr.L2(1e-4)) or a list of them, "
            f"got {type(rules).__name__} {rules!r:.60}"
        )
    out = list(rules)
    for i, r in enumerate(out):
        if isinstance(r, type) and issubclass(r, Rule):
            raise TypeError(
                f"rules[{i}]: got the class tr.{r.__name__}, not an instance; "
                f"write tr.{r.__name__}(strength, ...)"
            )
        if not isinstance(r, Rule):
            raise TypeError(
                f"rules[{i}] must be a penalty or constraint (e.g. tr.L2(1e-4)), "
                f"got {type(r).__name__}"
            )
    for i, r in enumerate(out):
        j = next((j for j in range(i) if out[j] is r), None)
        if j is not None:
            raise ValueError(
                f"rules[{j}] and rules[{i}] are the same {type(r).__name__} instance: it would "
                "apply twice. Pass it once (or two instances, with distinct name=)"
            )
    if not out and not allow_empty:
        raise ValueError(
            "rules is empty: a Regularizer without rules does nothing; pass at least one rule "
            "(e.g. [tr.L2(1e-4)]), or allow_empty=True"
        )
    return out


# rule instance -> the Regularizer that owns it (weakly: a rule of a collected regularizer is free)
_OWNERS: weakref.WeakKeyDictionary[Rule, Any] = weakref.WeakKeyDictionary()


def own(rule: Rule, owner: Any) -> Rule:
    """``rule`` itself if it is free (or already ``owner``'s), else a copy owned by ``owner``."""
    ref = _OWNERS.get(rule)
    current = ref() if ref is not None else None
    if current is not None and current is not owner:
        rule = copy.copy(rule)
        rule._unbind()
    _OWNERS[rule] = weakref.ref(owner)
    return rule


def rule_names(rules: list[Rule]) -> list[str]:
    """Each rule's name: ``name=`` or the lower-case class name, ``_1``, ``_2``… for repeats."""
    explicit = [r.name for r in rules if r.name is not None]
    dup = sorted({n for n in explicit if explicit.count(n) > 1})
    if dup:
        raise ValueError(f"rule name {dup[0]!r} is used by two rules; give each a distinct name=")
    taken = set(explicit)
    used: dict[str, int] = {}
    out: list[str] = []
    for r in rules:
        nm = r.name
        if nm is None:
            base = r.default_name
            n = used.get(base, 0)
            nm = base if n == 0 else f"{base}_{n}"
            while nm in taken:
                n += 1
                nm = f"{base}_{n}"
            used[base] = n + 1
            taken.add(nm)
        out.append(nm)
    return out


def bind_rules(
    model: nn.Module,
    index: _select.ParamIndex,
    rules: list[Rule],
    names: list[str],
    allow_empty: bool,
    rebind: bool = False,
) -> list[Binding]:
    """Match every parameter rule's selector on ``index`` and bind the rule (activity rules
    select modules: they get a binding without parameters). ``rebind``: the rules were bound
    before and the model's parameters were replaced (``Rule._rebind``)."""
    flat = _dist.fsdp1_managed(model)  # FSDP1 flat parameters: elementwise rules only
    out: list[Binding] = []
    for r, nm in zip(rules, names):
        if isinstance(r, ActivityPenalty):
            out.append(Binding(r, nm, []))
            continue
        hit = r.on.match(index)
        infos = [info for i, info in enumerate(index.params) if i in hit]
        if not infos and not allow_empty:
            raise ValueError(
                f"rule {nm!r} ({type(r).__name__}, on={r.on!r}) selects no parameter of "
                f"{type(model).__name__}; check the selector, or pass allow_empty=True"
                + _dist.empty_selection_hint(flat)
            )
        _select.check_selectable(nm, infos)
        _check_sparse(r, nm, infos)
        binding = Binding(r, nm, infos)
        _dist.check_flat_params(flat, [binding])
        bind = r._rebind if rebind else r._bind
        bind([i.name for i in infos], [i.param for i in infos], [i.module for i in infos])
        out.append(binding)
    check_prox_conflicts(out, index)
    return out


def _check_sparse(rule: Rule, name: str, infos: list[_select.ParamInfo]) -> None:
    """Grad-mode rules need dense gradients: ``nn.Embedding(sparse=True)`` gives sparse ones."""
    if rule.mode != "grad":
        return
    bad = [
        i.name
        for i in infos
        if any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in i.owners)
    ]
    if bad:
        raise ValueError(
            f"rule {name!r} ({type(rule).__name__}, mode='grad') selects parameters with sparse "
            f"gradients (nn.Embedding/EmbeddingBag with sparse=True): {', '.join(bad)}. A dense "
            "λ∇R(θ) cannot be added to a sparse gradient; use mode='decoupled' or 'prox' for "
            "them, or narrow on="
        )


def check_prox_conflicts(bindings: list[Binding], index: _select.ParamIndex, where: str = "") -> None:
    """Two ``"prox"`` rules on one parameter have no defined order: raise naming them."""
    owners: dict[int, list[str]] = defaultdict(list)
    for b in bindings:
        if b.rule.mode == "prox":
            for info in b.infos:
                owners[id(info.param)].append(b.name)
    clash = [
        f"{info.name} ({', '.join(owners[id(info.param)])})"
        for info in index.params
        if len(owners[id(info.param)]) > 1
    ]
    if clash:
        raise ValueError(
            f"two 'prox' rules{where} select the same parameter: "
            + "; ".join(clash)
            + ". Combine them in one penalty (tr.ElasticNet, tr.SparseGroupLasso) or use "
            "another mode for one of them"
        )


def fingerprint(model: nn.Module) -> tuple[int, ...]:
    """Identity of the model's parameter tensors: changes when any of them is replaced."""
    return tuple(id(p) for p in model.parameters())


_PARAMS = operator.attrgetter("_parameters")
_MODULES = operator.attrgetter("_modules")


class ModelWatch:
    """Whether a model's parameters may have changed since the last :meth:`reset`.

    Every way of replacing, adding or removing a parameter or a submodule (``setattr``,
    ``register_parameter``, ``load_state_dict(assign=True)``, ``to_empty``/``_apply``,
    FSDP2 and parametrizations writing ``module._parameters[name]`` directly) writes one of
    the ``_parameters``/``_modules`` dicts of a module of the tree, or replaces such a
    dict. :meth:`changed` compares those dicts and their values, by identity, with the
    snapshot: a few C-level ``map`` passes (about 15 ns per entry), where walking
    ``model.parameters()`` costs about 0.5 µs per parameter. True is only a hint that
    :func:`fingerprint` then decides (a replaced activation module changes the tree, not
    the parameters). A tree with a dict that is not a plain ``dict`` answers True always.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        """Snapshot the tree as it is now."""
        mods = list(self.model.modules())
        self._mods = mods
        self._pdicts = list(map(_PARAMS, mods))
        self._mdicts = list(map(_MODULES, mods))
        self._dicts = self._pdicts + self._mdicts
        self._plain = all(type(d) is dict for d in self._dicts)
        self._values = list(chain.from_iterable(map(dict.values, self._dicts))) if self._plain else []

    def changed(self) -> bool:
        """True if a parameter or submodule may have been replaced, added or removed."""
        if not (
            self._plain
            and all(map(operator.is_, map(_PARAMS, self._mods), self._pdicts))
            and all(map(operator.is_, map(_MODULES, self._mods), self._mdicts))
        ):
            return True
        values = self._values
        return sum(map(len, self._dicts)) != len(values) or not all(
            map(operator.is_, chain.from_iterable(map(dict.values, self._dicts)), values)
        )
