"""Coupled groups: groups of parameter slices that span several tensors.

A *coupled group* is every slice that belongs to one prunable channel (or attention head):
the rows of the conv/linear weight and bias that produce it, the BatchNorm gain and bias
entries that scale it, the columns of every consumer that reads it. A
:class:`CoupledGroups` holds *group sets* (one per Torch-Pruning dependency group, or
per set written by hand); a set has ``n_groups`` groups and *members*: one member is one
tensor sliced along one dim, each index of that dim assigned to one group of the set.

``tr.GroupLasso(λ, groups=...)`` (and ``SparseGroupLasso``) penalize
R(θ) = λ·Σ_g √size_g·‖θ_g‖₂ over every coupled group g, where θ_g is the whole slice set
(all members) and size_g its number of elements. The rule binds by parameter name (as
``tr.select`` names them) when the :class:`~torch_regularizers.Regularizer` is built;
its ``on=`` defaults to exactly the parameters the grouping covers.

The math, per group set, on the hot path (no Python loop over channels): per member one
per-index sum of squares (a norm over the other dims), one ``index_add`` into the set's
squared group norms, and one broadcast multiply (prox, decoupled) or ``addcmul`` (grad)
with the per-group factor gathered back to the member's dim.

**Overlaps.** With consumer columns included (``channel_groups(consumers=True)``, the
default) an element can belong to two groups: ``W2[i, j]`` is in the group of W2's output
channel i and in the group of W1's output channel j that W2 reads. Value and gradient are
the exact sums over groups. The prox of overlapping groups has no closed form; it is
computed as the product of every group's block soft-threshold factor
max(0, 1 − tλ√size_g/‖θ_g‖), all factors taken from the same θ (so it does not depend on
an order). For disjoint groups (``consumers=False``, or groups written by hand without
overlap) this is exactly the block soft-threshold; with overlaps every group whose norm
is at or below its threshold still becomes exactly zero, all of its slices at once.

**Split calls.** A step calls the rule once per bucket (param group, device, dtype), so
the tensors of one coupled group can arrive in two calls (weights and BatchNorm in two
param groups). The group norms of a prox or decoupled update are then taken once, before
the first call changes anything, and reused for the other tensors of that step (each with
its own step size): with equal learning rates this is exactly the prox of the whole set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as _dist
from .. import select as _select
from .._precision import LOW_PRECISION as _LOW
from ..penalties import _soft_threshold_

__all__ = ["CoupledGroups", "GroupSet", "Member"]


# --------------------------------------------------------------------------- description
@dataclass(frozen=True)
class Member:
    """One tensor of a group set, sliced along ``dim``: index ``index[k]`` of that dim
    belongs to group ``group[k]`` of the set. ``role``: ``"out"`` for the slices that
    produce the channel (conv/linear rows and biases, norm gains and biases), ``"in"`` for
    consumer input columns."""

    name: str
    dim: int
    index: tuple[int, ...]
    group: tuple[int, ...]
    role: str = "out"


@dataclass(frozen=True)
class GroupSet:
    """``n_groups`` coupled groups sharing one slicing (one Torch-Pruning group).

    ``label``: the root layer's name (``"layer1.0.conv1"``) or the name given by hand;
    ``heads``: the number of attention heads the channels were merged into, else None.
    """

    label: str
    n_groups: int
    members: tuple[Member, ...]
    heads: int | None = None
    #: Torch-Pruning data for ``shrink`` (root module name, root channel of every group)
    root_channels: tuple[tuple[int, ...], ...] | None = field(default=None, repr=False)

    def slices(self, g: int) -> list[tuple[str, int, list[int]]]:
        """The slices of group ``g``: ``[(param name, dim, indices along dim), ...]``."""
        if not 0 <= g < self.n_groups:
            raise IndexError(f"group {g} of set {self.label!r} (it has {self.n_groups})")
        out = []
        for m in self.members:
            idx = [i for i, gg in zip(m.index, m.group) if gg == g]
            if idx:
                out.append((m.name, m.dim, idx))
        return out


class _Exact(_select.Selector):
    """Exactly these parameter names (any name of a tied parameter), no glob."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def _test(self, info):
        return any(n in self.names for n in info.names)

    def __repr__(self):
        shown = sorted(self.names)
        more = f", … {len(shown) - 4} more" if len(shown) > 4 else ""
        return f"coupled({', '.join(map(repr, shown[:4]))}{more})"


def _norm_member(spec: Any, where: str) -> tuple:
    if isinstance(spec, Member):
        return (spec.name, spec.dim, spec.index, spec.group, spec.role)
    if not isinstance(spec, (tuple, list)) or not 2 <= len(spec) <= 5:
        raise TypeError(
            f"{where}: a member is (name, dim), (name, dim, index) or (name, dim, index, group), "
            f"got {spec!r:.80}"
        )
    name, dim, *rest = spec
    index = rest[0] if len(rest) > 0 else None
    group = rest[1] if len(rest) > 1 else None
    role = rest[2] if len(rest) > 2 else "out"
    return (name, dim, index, group, role)


class CoupledGroups:
    """Coupled groups over a model's parameters, by name (see the module docstring).

    Usually built by :func:`torch_regularizers.prune.channel_groups` from Torch-Pruning's
    dependency graph. By hand: ``sets`` maps a label to its members, each
    ``(param name, dim)`` (every index of ``dim`` is its own group: index i → group i),
    ``(name, dim, index)`` (these indices, group k for the k-th) or
    ``(name, dim, index, group)``::

        tr.prune.CoupledGroups(model, {
            "fc1": [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)],
        })

    makes one group per hidden unit of ``fc1 → fc2``: its row of ``fc1.weight``, its
    ``fc1.bias`` entry and its column of ``fc2.weight``. Names are the ``tr.select``
    names (wrapper prefixes removed); the shapes are recorded, and a rule built with
    this grouping refuses parameters of other shapes (rebuild the grouping after
    :func:`~torch_regularizers.prune.shrink`).

    Attributes: ``sets`` (list of :class:`GroupSet`), ``names`` (the covered parameters,
    in model order), ``shapes``, ``n_groups`` (total), ``skipped`` (``(label, reason)`` of
    the dependency groups that were left out, for ``channel_groups``).
    """

    def __init__(
        self,
        model: nn.Module,
        sets: Mapping[str, Sequence[Any]] | Sequence[GroupSet],
        *,
        skipped: Sequence[tuple[str, str]] = (),
        options: Mapping[str, Any] | None = None,
    ) -> None:
        index = _select.index(model)
        canon: dict[str, _select.ParamInfo] = {}
        for info in index.params:
            for n in info.names:
                canon[n] = info
        order = {info.name: i for i, info in enumerate(index.params)}
        built: list[GroupSet] = []
        items = list(sets.items()) if isinstance(sets, Mapping) else [(s.label, s) for s in sets]
        if not items:
            raise ValueError("CoupledGroups: no group set given")
        for label, spec in items:
            if isinstance(spec, GroupSet):
                built.append(self._check_set(spec, canon))
                continue
            where = f"CoupledGroups[{label!r}]"
            if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec:
                raise TypeError(f"{where}: expected a non-empty list of members, got {spec!r:.80}")
            members = []
            for k, raw in enumerate(spec):
                name, dim, idx, grp, role = _norm_member(raw, f"{where}[{k}]")
                info = canon.get(name)
                if info is None:
                    raise ValueError(f"{where}[{k}]: the model has no parameter named {name!r}")
                p = info.param
                if isinstance(dim, bool) or not isinstance(dim, int) or not -p.dim() <= dim < p.dim():
                    raise ValueError(
                        f"{where}[{k}]: dim={dim!r} is not a dim of {name} (shape {tuple(p.shape)})"
                    )
                dim %= p.dim()
                n_d = p.shape[dim]
                idx = tuple(range(n_d)) if idx is None else tuple(int(i) for i in idx)
                grp = tuple(range(len(idx))) if grp is None else tuple(int(g) for g in grp)
                members.append(Member(info.name, dim, idx, grp, role))
            n_groups = 1 + max((max(m.group) for m in members if m.group), default=-1)
            built.append(self._check_set(GroupSet(str(label), n_groups, tuple(members)), canon))
        self.sets: list[GroupSet] = built
        names = {m.name for s in built for m in s.members}
        self.names: tuple[str, ...] = tuple(sorted(names, key=lambda n: order[n]))
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(canon[n].param.shape) for n in self.names}
        self.skipped: list[tuple[str, str]] = list(skipped)
        self.options: dict[str, Any] = dict(options or {})
        self._sizes = [self._set_sizes(s) for s in built]

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_set(s: GroupSet, canon: Mapping[str, _select.ParamInfo]) -> GroupSet:
        where = f"CoupledGroups[{s.label!r}]"
        if s.n_groups < 1:
            raise ValueError(f"{where}: a group set needs at least one group")
        seen_groups: set[int] = set()
        members = []
        for m in s.members:
            info = canon.get(m.name)
            if info is None:
                raise ValueError(f"{where}: the model has no parameter named {m.name!r}")
            if info.name != m.name:
                m = Member(info.name, m.dim, m.index, m.group, m.role)
            members.append(m)
            p = info.param
            n_d = p.shape[m.dim]
            if len(m.index) != len(m.group):
                raise ValueError(f"{where}: {m.name}: index and group differ in length")
            if len(set(m.index)) != len(m.index):
                raise ValueError(f"{where}: {m.name} dim {m.dim}: an index is listed twice")
            bad = [i for i in m.index if not 0 <= i < n_d]
            if bad:
                raise ValueError(
                    f"{where}: {m.name} dim {m.dim} has size {n_d}, got index {bad[0]}"
                )
            badg = [g for g in m.group if not 0 <= g < s.n_groups]
            if badg:
                raise ValueError(f"{where}: group id {badg[0]} is not in [0, {s.n_groups})")
            if m.role not in ("out", "in"):
                raise ValueError(f"{where}: role must be 'out' or 'in', got {m.role!r}")
            seen_groups.update(m.group)
        empty = sorted(set(range(s.n_groups)) - seen_groups)
        if empty:
            raise ValueError(f"{where}: group {empty[0]} has no slice")
        pairs = [(m.name, m.dim) for m in members]
        if len(set(pairs)) != len(pairs):
            dup = next(p for p in pairs if pairs.count(p) > 1)
            raise ValueError(
                f"{where}: {dup[0]} dim {dup[1]} appears twice; give it once, with all its indices"
            )
        return GroupSet(s.label, s.n_groups, tuple(members), s.heads, s.root_channels)

    def _set_sizes(self, s: GroupSet) -> list[int]:
        sizes = [0] * s.n_groups
        for m in s.members:
            shape = self.shapes[m.name]
            per = math.prod(shape) // shape[m.dim] if shape[m.dim] else 0
            for g in m.group:
                sizes[g] += per
        return sizes

    # ------------------------------------------------------------------ public
    @property
    def n_groups(self) -> int:
        """Total number of coupled groups (over every set)."""
        return sum(s.n_groups for s in self.sets)

    def __len__(self) -> int:
        return self.n_groups

    def sizes(self, label: str) -> list[int]:
        """Number of elements of every group of set ``label``."""
        return list(self._sizes[self._set_index(label)])

    def _set_index(self, label: str) -> int:
        for i, s in enumerate(self.sets):
            if s.label == label:
                return i
        raise KeyError(f"no group set {label!r}; sets are {[s.label for s in self.sets]}")

    def __getitem__(self, label: str) -> GroupSet:
        return self.sets[self._set_index(label)]

    def selector(self) -> _select.Selector:
        """A selector of exactly the covered parameters (the default ``on=`` of a rule)."""
        return _Exact(self.names)

    def group_norms(self, model: nn.Module) -> dict[str, Tensor]:
        """Set label → the L2 norm of each of its groups (fp32/fp64), from ``model``'s current
        parameters (which must have the recorded shapes)."""
        infos = _select.index(model)
        byname = {n: info.param for info in infos.params for n in info.names}
        missing = [n for n in self.names if n not in byname]
        if missing:
            raise ValueError(f"CoupledGroups.group_norms: the model has no {', '.join(missing)}")
        plan = _Bound(self, "CoupledGroups", list(self.names), [byname[n] for n in self.names])
        with torch.no_grad():
            sq = plan.sq_norms()
        return {s.label: q.sqrt() for s, q in zip(self.sets, sq)}

    def __repr__(self) -> str:
        return (
            f"CoupledGroups({len(self.sets)} sets, {self.n_groups} groups over "
            f"{len(self.names)} tensors{f', {len(self.skipped)} skipped' if self.skipped else ''})"
        )

    # ------------------------------------------------------------------ rule protocol
    def _bind_rule(self, owner: str, names: list[str], params: list) -> _Bound:
        """Bind to the parameters a rule selected (called by the rule's ``_bind``)."""
        return _Bound(self, owner, names, params)


# --------------------------------------------------------------------------- bound math
class _M:
    """One member, bound: tensors on the parameter's device."""

    __slots__ = ("bshape", "dim", "full", "grp", "identity", "idx", "j", "n_d", "others", "set")

    def __init__(self, s: int, j: int, m: Member, p: Tensor) -> None:
        dev = p.device
        self.set, self.j, self.dim = s, j, m.dim
        self.n_d = p.shape[m.dim]
        self.others = tuple(d for d in range(p.dim()) if d != m.dim)
        self.bshape = tuple(self.n_d if d == m.dim else 1 for d in range(p.dim()))
        self.full = m.index == tuple(range(self.n_d))
        self.identity = self.full and m.group == tuple(range(self.n_d))
        self.idx = None if self.full else torch.tensor(m.index, dtype=torch.long, device=dev)
        self.grp = None if self.identity else torch.tensor(m.group, dtype=torch.long, device=dev)


@dataclass
class _Round:
    """Group norms of a prox/decoupled update taken before its first call changed anything,
    for the tensors of the same update that arrive in a later call (another bucket)."""

    kind: str
    lam: float
    sq: list[Tensor]
    remaining: set[int]
    versions: dict[int, int]


def _acc_dtype(params: Sequence[Tensor]) -> torch.dtype:
    dt = torch.float32
    for p in params:
        if p.dtype not in _LOW:
            dt = torch.promote_types(dt, p.dtype)
    return dt


class _Bound:
    """A :class:`CoupledGroups` bound to the parameter tensors of one rule."""

    def __init__(self, groups: CoupledGroups, owner: str, names: list[str], params: list) -> None:
        want = set(groups.names)
        got = list(names)
        extra = [n for n in got if n not in want]
        missing = sorted(want - set(got))
        if extra or missing:
            raise ValueError(
                f"{owner}(groups=...): the rule must select exactly the parameters the grouping "
                f"covers (leave on= unset). Not in the grouping: {extra or 'none'}; covered but "
                f"not selected: {missing or 'none'}"
            )
        pos = {n: i for i, n in enumerate(got)}
        bad = [
            f"{n} (grouping {groups.shapes[n]}, parameter {tuple(params[pos[n]].shape)})"
            for n in groups.names
            if tuple(params[pos[n]].shape) != groups.shapes[n]
        ]
        if bad:
            raise ValueError(
                f"{owner}(groups=...): parameter shapes differ from the ones the grouping was built "
                f"for: {', '.join(bad)}. Build the grouping again for the current model (after "
                "tr.prune.shrink, call tr.prune.channel_groups again)"
            )
        dt = [n for n, p in zip(got, params) if _dist.is_dtensor(p)]
        if dt:
            raise ValueError(
                f"{owner}(groups=...): sharded (DTensor) parameters are not supported: {', '.join(dt)}"
            )
        self.params: list[Tensor] = [params[pos[n]] for n in groups.names]
        devs = {p.device for p in self.params}
        if len(devs) > 1:
            raise ValueError(
                f"{owner}(groups=...): the grouping's parameters are on several devices "
                f"({', '.join(map(str, devs))}); coupled groups need one device"
            )
        self.owner = owner
        self.groups = groups
        self.device = self.params[0].device
        self.acc = _acc_dtype(self.params)
        self.by_id = {id(p): j for j, p in enumerate(self.params)}
        self.n_groups = [s.n_groups for s in groups.sets]
        self.members: list[_M] = []
        self.of_param: list[list[_M]] = [[] for _ in self.params]
        jpos = {n: j for j, n in enumerate(groups.names)}
        for si, s in enumerate(groups.sets):
            for m in s.members:
                j = jpos[m.name]
                bm = _M(si, j, m, self.params[j])
                self.members.append(bm)
                self.of_param[j].append(bm)
        # a tensor sliced along two dims (a consumer conv: its rows in one set, its columns in
        # another) is read once: one norm over the other dims, then a sum per member dim;
        # and its factors are combined into one small tensor applied in one pass
        self.shared: list[tuple[tuple[int, ...], tuple[int, ...]] | None] = []
        self.combine: list[bool] = []
        for j, ms in enumerate(self.of_param):
            p = self.params[j]
            dims = tuple(sorted({m.dim for m in ms}))
            core = math.prod(p.shape[d] for d in dims)
            others = tuple(d for d in range(p.dim()) if d not in dims)
            ok = len(ms) > 1 and len(dims) == len(ms)
            self.shared.append((dims, others) if ok else None)
            self.combine.append(bool(ok and others and 4 * core <= p.numel()))
        self.root_size = [
            torch.tensor(sz, dtype=self.acc, device=self.device).sqrt_() for sz in groups._sizes
        ]
        self._round: _Round | None = None

    # ------------------------------------------------------------------ lookup
    def position(self, p: Tensor) -> int:
        j = self.by_id.get(id(p))
        if j is not None:
            return j
        for j, q in enumerate(self.params):  # a detached alias (same storage and layout)
            if (
                p.shape == q.shape
                and p.stride() == q.stride()
                and p.data_ptr() == q.data_ptr()
                and p.storage_offset() == q.storage_offset()
            ):
                return j
        raise ValueError(
            f"{self.owner}(groups=...): this tensor is not one of the grouping's parameters "
            f"({', '.join(self.groups.names[:4])}{', …' if len(self.params) > 4 else ''})"
        )

    def positions(self, ps: Sequence[Tensor]) -> list[int]:
        return [self.position(p) for p in ps]

    # ------------------------------------------------------------------ norms
    def _sumsq(self, p: Tensor, others: tuple[int, ...], keepdim: bool = False) -> Tensor:
        """Σ p² over ``others`` (acc dtype; differentiable). A norm kernel when they are the
        trailing dims of a contiguous tensor, else squares and a sum (torch's CPU norm over
        a leading dim is ~10x slower than that)."""
        a = p.to(self.acc)
        if not others:
            return a * a
        nd = p.dim()
        if p.is_contiguous() and others == tuple(range(nd - len(others), nd)):
            return torch.linalg.vector_norm(p, dim=others, keepdim=keepdim, dtype=self.acc).square()
        return (a * a).sum(dim=others, keepdim=keepdim)

    def _index_sq(self, m: _M, p: Tensor) -> Tensor:
        """Sum of squares of every index of ``m.dim`` of ``p`` (acc dtype), shape (n_d,)."""
        return self._sumsq(p, m.others)

    def sq_norms(self, values: Mapping[int, Tensor] | None = None, differentiable: bool = False) -> list[Tensor]:
        """Squared group norms of every set; ``values[j]`` replaces parameter j's values."""
        sq = [torch.zeros(g, dtype=self.acc, device=self.device) for g in self.n_groups]
        for j, ms in enumerate(self.of_param):
            if not ms:
                continue
            p = self.params[j] if values is None or j not in values else values[j]
            shared = self.shared[j]
            if shared is None:
                per = [(m, self._index_sq(m, p)) for m in ms]
            else:
                dims, others = shared
                core = self._sumsq(p, others, keepdim=True)
                per = []
                for m in ms:
                    red = tuple(d for d in dims if d != m.dim)
                    per.append((m, core.sum(dim=red).reshape(-1)))
            for m, s in per:
                if m.idx is not None:
                    s = s.index_select(0, m.idx)
                if differentiable:
                    sq[m.set] = sq[m.set] + s if m.grp is None else sq[m.set].index_add(0, m.grp, s)
                elif m.grp is None:
                    sq[m.set].add_(s)
                else:
                    sq[m.set].index_add_(0, m.grp, s)
        return sq

    def _factors(self, j: int, vecs: Mapping[int, Tensor], fill: float, prod: bool) -> list[Tensor]:
        """The per-member factors of parameter j (broadcastable), combined into one (product
        or sum) when the tensor is sliced along two dims of a small core."""
        vs = [self._expand(vecs[m.set], m, fill) for m in self.of_param[j]]
        if len(vs) > 1 and self.combine[j]:
            total = vs[0]
            for v in vs[1:]:
                total = total * v if prod else total + v
            return [total]
        return vs

    def ref_sq_norms(self, values: Mapping[int, Tensor] | None = None) -> list[Tensor]:
        """The written-out reference: one group at a time, every slice gathered and squared."""
        out = []
        for s in self.groups.sets:
            vals = []
            for g in range(s.n_groups):
                total = torch.zeros((), dtype=self.acc, device=self.device)
                for name, dim, idx in s.slices(g):
                    j = self.groups.names.index(name)
                    p = self.params[j] if values is None or j not in values else values[j]
                    x = p.index_select(dim, torch.tensor(idx, device=self.device)).to(self.acc)
                    total = total + (x * x).sum()
                vals.append(total)
            out.append(torch.stack(vals))
        return out

    @staticmethod
    def _safe_sqrt(sq: Tensor) -> Tensor:
        """√sq with gradient 0 (not NaN) at an all-zero group."""
        pos = sq > 0
        return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))

    # ------------------------------------------------------------------ per-group factors
    def _coef(self, sq: Tensor, si: int, lam: float) -> Tensor:
        """λ√size_g/‖θ_g‖, 0 for a zero (or subnormal) group: ∇ of the group term is θ_g·coef."""
        n = sq.sqrt()
        w = lam * self.root_size[si]
        floor = torch.finfo(n.dtype).tiny * w.abs().clamp_min(1)
        return torch.where(n > floor, w / torch.maximum(n, floor), torch.zeros_like(n))

    def _shrink(self, sq: Tensor, si: int, lam: float, t: Any) -> Tensor:
        """max(0, 1 − tλ√size_g/‖θ_g‖): 1 exactly when t = 0, 0 for a zero group."""
        n = sq.sqrt()
        thr = (lam * self.root_size[si]) * t
        return (1 - thr / n.clamp_min(torch.finfo(n.dtype).tiny)).clamp_min_(0)

    def _expand(self, vec: Tensor, m: _M, fill: float) -> Tensor:
        """A per-group vector as a per-index factor of ``m``'s dim, broadcastable to the tensor."""
        if m.identity:
            v = vec
        elif m.full:
            v = vec.index_select(0, m.grp)
        else:
            v = torch.full((m.n_d,), fill, dtype=vec.dtype, device=vec.device)
            v.index_copy_(0, m.idx, vec.index_select(0, m.grp))
        return v.view(m.bshape)

    # ------------------------------------------------------------------ value / single tensor
    def value_share(self, p: Tensor, lam: float) -> Tensor:
        """Σ_g λ√size_g‖θ_g‖ for the grouping's first tensor, 0 for the others (the penalty is
        not a sum over tensors; summed over the bound tensors it is R). Differentiable."""
        j = self.position(p)
        if j != 0:
            return torch.zeros((), dtype=self.acc, device=self.device)
        return self.value(lam)

    def value(self, lam: float) -> Tensor:
        sq = self.sq_norms(differentiable=torch.is_grad_enabled())
        total = torch.zeros((), dtype=self.acc, device=self.device)
        for si, q in enumerate(sq):
            total = total + (self.root_size[si] * self._safe_sqrt(q)).sum()
        return lam * total

    def coef_of(self, p: Tensor, lam: float) -> Tensor:
        """Σ over the groups containing each element of ``p`` of λ√size_g/‖θ_g‖ (broadcastable
        to ``p``): ∂R/∂p = p·coef, with every other tensor at its current value."""
        j = self.position(p)
        sq = self.sq_norms()
        coefs = {si: self._coef(sq[si], si, lam) for si in {m.set for m in self.of_param[j]}}
        total: Tensor | None = None
        for m in self.of_param[j]:
            v = self._expand(coefs[m.set], m, 0.0)
            total = v if total is None else total + v
        return total.to(self.acc)

    # ------------------------------------------------------------------ rounds
    def _continued(self, kind: str, pos: list[int], lam: float) -> list[Tensor] | None:
        """The squared norms of the open round this call continues (same update, tensors of
        it not yet handled and unchanged since it began), else None. Call before changing
        anything."""
        r = self._round
        ps = set(pos)
        if (
            r is None
            or r.kind != kind
            or r.lam != lam
            or not ps <= r.remaining
            or any(self.params[j]._version != r.versions[j] for j in ps)
        ):
            return None
        r.remaining -= ps
        if not r.remaining:
            self._round = None
        return r.sq

    def _begin(self, kind: str, pos: list[int], lam: float, sq: list[Tensor]) -> None:
        """Open a round for the tensors this call did not get (their versions as of now)."""
        rest = set(range(len(self.params))) - set(pos)
        self._round = (
            _Round(kind, lam, sq, rest, {j: self.params[j]._version for j in rest}) if rest else None
        )

    # ------------------------------------------------------------------ in-place updates
    def grad_(self, ps, gs, lam: float, scale: Any, rho: float = 0.0, reference: bool = False) -> None:
        """g ← g + scale·∇R(θ) for the given tensors (R with the other tensors as they are)."""
        pos = self.positions(ps)
        lam_g = lam * (1 - rho)
        if reference:
            return self._ref_apply("grad", pos, ps, gs, lam, scale, rho)
        if lam_g:
            sq = self.sq_norms()
            coefs = {si: self._coef(q, si, lam_g) for si, q in enumerate(sq)}
        for j, p, g in zip(pos, ps, gs):
            if lam_g:
                for v in self._factors(j, coefs, 0.0, prod=False):
                    if isinstance(scale, Tensor):
                        g.addcmul_(p, v * scale)
                    else:
                        g.addcmul_(p, v, value=scale)
            if rho:
                sgn = torch.sign(p)
                if isinstance(scale, Tensor):
                    g.add_(sgn.mul_(scale * (lam * rho)))
                else:
                    g.add_(sgn, alpha=lam * rho * scale)

    def decay_(self, ps, lam: float, eta: Any, rho: float = 0.0, reference: bool = False) -> None:
        """θ ← θ − η·∇R(θ), the norms taken before the update."""
        pos = self.positions(ps)
        lam_g = lam * (1 - rho)
        sq = None
        if lam_g:
            sq = self._continued("decay", pos, lam)
            if sq is None:
                sq = self.ref_sq_norms() if reference else self.sq_norms()
                self._begin("decay", pos, lam, sq)
        if reference:
            return self._ref_apply("decay", pos, ps, None, lam, eta, rho, sq)
        coefs = {}
        for j, p in zip(pos, ps):
            sgn = torch.sign(p) if rho else None
            ms = self.of_param[j] if lam_g else []
            for m in ms:
                if m.set not in coefs:
                    coefs[m.set] = self._coef(sq[m.set], m.set, lam_g)
            if len(ms) == 1:
                p.mul_(1 - eta * self._expand(coefs[ms[0].set], ms[0], 0.0))
            elif ms:
                total = None
                for m in ms:
                    v = self._expand(coefs[m.set], m, 0.0)
                    total = v if total is None else total + v
                p.mul_(1 - eta * total)
            if rho:
                if isinstance(eta, Tensor):
                    p.sub_(sgn.mul_(eta * (lam * rho)))
                else:
                    p.add_(sgn, alpha=-eta * lam * rho)

    def prox_(self, ps, lam: float, eta: Any, rho: float = 0.0, reference: bool = False) -> None:
        """θ ← prox: soft-threshold by ηλρ (sparse group lasso), then every group's block
        soft-threshold factor, all factors from the same (soft-thresholded) θ."""
        pos = self.positions(ps)
        lam_g = lam * (1 - rho)
        t1 = eta * (lam * rho) if rho else None
        sq = self._continued("prox", pos, lam) if lam_g else None
        for p in ps:
            if rho:
                _soft_threshold_(p, t1)
        if not lam_g:
            return
        if sq is None:
            called = set(pos)
            others = {  # the L1 part of the tensors of later calls, on copies
                j: _soft_threshold_(self.params[j].detach().clone(), t1)
                for j in range(len(self.params))
                if rho and j not in called
            }
            sq = self.ref_sq_norms(others) if reference else self.sq_norms(others)
            self._begin("prox", pos, lam, sq)
        if reference:
            return self._ref_apply("prox", pos, ps, None, lam, eta, rho, sq)
        factors: dict[int, Tensor] = {}
        for j, p in zip(pos, ps):
            for m in self.of_param[j]:
                if m.set not in factors:
                    factors[m.set] = self._shrink(sq[m.set], m.set, lam_g, eta)
            for f in self._factors(j, factors, 1.0, prod=True):
                p.mul_(f)

    # ------------------------------------------------------------------ reference (tests)
    def _ref_apply(self, kind, pos, ps, gs, lam, coef, rho, sq=None) -> None:
        """Plain per-group loops: the ground truth of the vectorized paths (``sq``: the
        squared norms of the update's round, else those of the tensors as they are now)."""
        lam_g = lam * (1 - rho)
        names = self.groups.names
        if sq is None:
            sq = self.ref_sq_norms()
        called = dict(zip(pos, range(len(ps))))
        deltas = {j: torch.zeros_like(ps[k], dtype=self.acc) for j, k in called.items()}
        for si, s in enumerate(self.groups.sets):
            for g in range(s.n_groups):
                n = sq[si][g].sqrt()
                w = lam_g * math.sqrt(self.groups._sizes[si][g])
                for name, dim, idx in s.slices(g):
                    j = names.index(name)
                    if j not in called:
                        continue
                    p = ps[called[j]]
                    it = torch.tensor(idx, device=self.device)
                    x = p.index_select(dim, it).to(self.acc)
                    if kind == "prox":
                        f = torch.clamp(1 - coef * w / n, min=0) if n > 0 else torch.zeros(())
                        p.index_copy_(dim, it, (x * f).to(p.dtype))
                    else:
                        c = w / n if n > 0 else torch.zeros((), dtype=self.acc)
                        deltas[j].index_add_(dim, it, x * c)
        if kind == "prox":
            return
        for j, k in called.items():
            p = ps[k]
            d = deltas[j]
            if rho:
                d = d + torch.sign(p).to(self.acc) * (lam * rho)
            if kind == "grad":
                gs[k].add_((d * coef).to(gs[k].dtype))
            else:
                p.sub_((d * coef).to(p.dtype))

    # ------------------------------------------------------------------ stats
    def zero_group_count(self) -> tuple[Tensor, int]:
        sq = self.sq_norms()
        zg = torch.stack([(q == 0).sum() for q in sq]).sum()
        return zg, sum(self.n_groups)

