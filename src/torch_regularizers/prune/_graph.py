"""Coupled channel groups from Torch-Pruning's dependency graph, and ``shrink``.

Torch-Pruning (``pip install torch-pruning``, the ``[prune]`` extra) traces the model once
and yields one *dependency group* per set of coupled channels
(``DependencyGraph.get_all_groups()``): a conv/linear layer's output channels with the
BatchNorm that scales them, the consumers that read them, the other branch of a residual
add, the matching slices across a concatenation or a flatten. Every dependency group
becomes one :class:`~torch_regularizers.prune.GroupSet`; each of its channels (or, with
``num_heads``, each attention head) is one coupled group.

Slices per layer type (Torch-Pruning's own pruning functions remove exactly these):

=======================================  ===============================================
dependency                               slices of the channel
=======================================  ===============================================
Conv / Linear output                     weight row (dim 0; ``ConvTranspose``: dim 1), bias
Conv / Linear input (a consumer)         weight column (dim 1; ``ConvTranspose``: dim 0)
depthwise Conv                           weight row, bias
BatchNorm / InstanceNorm (affine)        weight and bias entry
PReLU (one slope per channel)            weight entry
Embedding                                weight column (dim 1)
an unwrapped ``nn.Parameter``            its pruning dim (Torch-Pruning's choice)
=======================================  ===============================================

Left out, with the reason in ``groups.skipped`` (a ``ValueError`` when ``on=`` names such a
group explicitly): channels that are outputs of the model (pruning them changes the output
shape); channels coupled with a LayerNorm or GroupNorm (it normalizes across the channels,
so removing a zero channel changes the others); ``nn.MultiheadAttention`` (Torch-Pruning
prunes its ``embed_dim`` keeping ``num_heads``, so ``head_dim`` and the 1/√head_dim scale
change: not whole heads, and not output-preserving); grouped (not depthwise) convolutions
and LSTMs. Heads are supported for attention written with separate q/k/v/o linear layers
(Hugging Face style), through ``num_heads={q_proj: H, k_proj: H, v_proj: H}`` (the same
argument as Torch-Pruning's pruners): the channels of one head form one group.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import select as _select
from ._coupled import CoupledGroups, GroupSet, Member

__all__ = ["ShrinkReport", "channel_groups", "shrink"]


def _tp():
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "tr.prune.channel_groups and tr.prune.shrink build on Torch-Pruning's dependency "
            "graph: pip install 'torch-regularizers[prune]' (or pip install torch-pruning)"
        ) from e
    return tp


# --------------------------------------------------------------------------- helpers
def _call(model: nn.Module, inputs: Any, forward_fn: Callable | None) -> Any:
    if forward_fn is not None:
        return forward_fn(model, inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


class _modes:
    """Restore every module's ``training`` flag on exit (Torch-Pruning's tracing leaves the
    model in eval mode)."""

    def __init__(self, model: nn.Module, eval_: bool = True) -> None:
        self.model, self.eval_ = model, eval_

    def __enter__(self):
        self.saved = [(m, m.training) for m in self.model.modules()]
        if self.eval_:
            self.model.eval()
        return self

    def __exit__(self, *exc):
        for m, t in self.saved:
            m.training = t
        return False


def _graph(model: nn.Module, inputs: Any, forward_fn, output_transform):
    """Torch-Pruning's dependency graph (traced in eval mode: BatchNorm running statistics
    do not move), and the grad_fns of the model's outputs."""
    tp = _tp()
    outs: list[Tensor] = []

    def fwd(m, x):
        out = _call(m, x, forward_fn)
        outs.extend(_tensors(out if output_transform is None else output_transform(out)))
        return out

    with _modes(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unwrapped parameters" / unknown ops notes
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=inputs, forward_fn=fwd, output_transform=output_transform,
            verbose=False,
        )
    return dg, {o.grad_fn for o in outs if o.grad_fn is not None}


_MIXING_NORMS: tuple[type, ...] = tuple(
    t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t is not None
)


@dataclass
class _Extracted:
    label: str
    root: nn.Module
    root_fn: Any
    n_root: int
    members: list[tuple]  # (name, dim, idx list, root list, role)
    weights: list[str]  # producer conv/linear weights (for on=)
    reasons: list[str] = field(default_factory=list)
    heads_of: dict[int, int] | None = None  # root channel -> head
    heads: int | None = None


def _module_name(dg, mod) -> str:
    return dg._module2name.get(mod, type(mod).__name__)


def _item_members(tp, dg, item, index: _select.ParamIndex, e: _Extracted) -> list[tuple]:
    """The parameter slices one dependency of a group removes (see the module table)."""
    f = tp.pruner.function
    dep = item.dep
    node, fn, mod = dep.target, dep.handler, dep.target.module
    role = "out" if dg.is_out_channel_pruning_fn(fn) else "in"
    idxs, roots = list(item.idxs), list(item.root_idxs or [])
    if len(roots) != len(idxs) or any(r is None for r in roots):
        e.reasons.append(f"{node.name}: Torch-Pruning gives no root index for its slices")
        return []

    def mem(p: Tensor, dim: int) -> tuple:
        info = index.info(p)
        if info is None:
            raise ValueError(f"channel_groups: a parameter of {node.name} is not in the model")
        return (info.name, dim % p.dim(), idxs, roots, role)

    name = _module_name(dg, mod)
    if isinstance(mod, nn.Parameter):
        return [mem(mod, node.pruning_dim)]
    if type(mod).__module__.startswith("torch_pruning"):  # reshape/concat/elementwise/output ops
        return []
    if fn in (f.prune_conv_out_channels, f.prune_conv_in_channels):
        if mod.groups > 1:
            e.reasons.append(
                f"grouped convolution {name} (groups={mod.groups}): Torch-Pruning removes the "
                "same local index from every convolution group; not supported"
            )
            return []
        out = fn == f.prune_conv_out_channels
        wdim = (1 if mod.transposed else 0) if out else (0 if mod.transposed else 1)
        ms = [mem(mod.weight, wdim)]
        if out and mod.bias is not None:
            ms.append(mem(mod.bias, 0))
        if out:
            e.weights.append(index.info(mod.weight).name)
        return ms
    if fn in (f.prune_depthwise_conv_out_channels, f.prune_depthwise_conv_in_channels):
        ms = [mem(mod.weight, 0)] + ([mem(mod.bias, 0)] if mod.bias is not None else [])
        e.weights.append(index.info(mod.weight).name)
        return [(*m[:4], "out") for m in ms]
    if fn == f.prune_linear_out_channels:
        e.weights.append(index.info(mod.weight).name)
        return [mem(mod.weight, 0)] + ([mem(mod.bias, 0)] if mod.bias is not None else [])
    if fn == f.prune_linear_in_channels:
        return [mem(mod.weight, 1)]
    if fn in (f.prune_batchnorm_out_channels, f.prune_instancenorm_out_channels):
        if not getattr(mod, "affine", False):
            return []
        return [(*m[:4], "out") for m in (mem(mod.weight, 0), mem(mod.bias, 0))]
    if fn == f.prune_prelu_out_channels:
        return [(*mem(mod.weight, 0)[:4], "out")] if mod.num_parameters > 1 else []
    if fn == f.prune_embedding_out_channels:
        return [(*mem(mod.weight, 1)[:4], "out")]
    if fn in (f.prune_layernorm_out_channels, f.prune_groupnorm_out_channels) or isinstance(
        mod, _MIXING_NORMS
    ):
        e.reasons.append(
            f"coupled with {type(mod).__name__} {name}: it normalizes across these channels, so "
            "removing a zero channel changes the others"
        )
        return []
    if isinstance(mod, nn.MultiheadAttention):
        e.reasons.append(
            f"coupled with nn.MultiheadAttention {name}: Torch-Pruning prunes its embed_dim "
            "(num_heads stays, head_dim and the 1/sqrt(head_dim) scale change), not whole heads; "
            "not supported (write the attention with separate q/k/v/o Linear layers and pass "
            "num_heads=)"
        )
        return []
    e.reasons.append(f"{type(mod).__name__} {name}: no slice mapping for {fn.__name__}; not supported")
    return []


def _merge(members: list[tuple]) -> list[tuple]:
    """One member per (parameter, dim): indices of repeated entries joined (first wins)."""
    out: dict[tuple[str, int], list] = {}
    for name, dim, idx, roots, role in members:
        cur = out.get((name, dim))
        if cur is None:
            out[(name, dim)] = [list(idx), list(roots), role]
            continue
        seen = set(cur[0])
        for i, r in zip(idx, roots):
            if i not in seen:
                cur[0].append(i)
                cur[1].append(r)
                seen.add(i)
        if role == "out":
            cur[2] = "out"
    return [(n, d, i, r, role) for (n, d), (i, r, role) in out.items()]


def _extract(
    model: nn.Module,
    inputs: Any,
    *,
    num_heads: Mapping[nn.Module, int] | None,
    root_types: Sequence[type] | None,
    forward_fn,
    output_transform,
) -> tuple[Any, list[_Extracted]]:
    tp = _tp()
    dg, out_fns = _graph(model, inputs, forward_fn, output_transform)
    index = _select.index(model)
    heads = dict(num_heads or {})
    for m in heads:
        if isinstance(m, nn.MultiheadAttention):
            raise NotImplementedError(
                "channel_groups(num_heads=...): nn.MultiheadAttention heads are not supported: "
                "Torch-Pruning prunes its embed_dim (num_heads stays, head_dim shrinks), never "
                "whole heads. Write the attention with separate q/k/v/o nn.Linear layers and "
                "pass num_heads={q_proj: H, k_proj: H, v_proj: H}"
            )
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            raise TypeError(
                f"channel_groups(num_heads=...): keys are the q/k/v projection layers "
                f"(nn.Linear), got {type(m).__name__}"
            )
    types = tuple(root_types) if root_types else (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)
    found: list[_Extracted] = []
    for group in dg.get_all_groups(root_module_types=types):
        root_dep = group[0].dep
        e = _Extracted(
            label=_module_name(dg, root_dep.target.module),
            root=root_dep.target.module,
            root_fn=root_dep.handler,
            n_root=len(group[0].idxs),
            members=[],
            weights=[],
        )
        for item in group:
            node, fn = item.dep.target, item.dep.handler
            out_fn = dg.is_out_channel_pruning_fn(fn)
            if out_fn and (
                isinstance(node.module, tp.ops._OutputOp)
                or not node.outputs
                or node.grad_fn in out_fns
            ):
                if not any("outputs of the model" in r for r in e.reasons):
                    e.reasons.append(
                        f"its channels are outputs of the model (at {node.name}): removing them "
                        "changes the output shape"
                    )
            e.members += _item_members(tp, dg, item, index, e)
        e.members = _merge(e.members)
        _assign_heads(e, heads, index)
        found.append(e)
    return dg, found


def _assign_heads(e: _Extracted, heads: Mapping[nn.Module, int], index: _select.ParamIndex) -> None:
    if not heads:
        return
    by_weight = {index.info(m.weight).name: (m, h) for m, h in heads.items() if index.info(m.weight)}
    head_of: dict[int, int] = {}
    n_heads = None
    for name, dim, idx, roots, role in e.members:
        if role != "out" or name not in by_weight:
            continue
        mod, h = by_weight[name]
        n_d = mod.weight.shape[dim]
        if h < 1 or n_d % h:
            raise ValueError(
                f"channel_groups(num_heads=...): {name} has {n_d} output channels, not a "
                f"multiple of num_heads={h}"
            )
        hd = n_d // h
        if n_heads is not None and n_heads != h:
            raise ValueError(
                f"channel_groups(num_heads=...): the coupled layers of {e.label} have different "
                f"head counts ({n_heads} and {h}); grouped-query attention is not supported"
            )
        n_heads = h
        for i, r in zip(idx, roots):
            hh = i // hd
            if head_of.setdefault(r, hh) != hh:
                raise ValueError(
                    f"channel_groups(num_heads=...): the heads of the layers coupled with "
                    f"{e.label} do not line up (channel {r})"
                )
    if n_heads is None:
        return
    if len(head_of) != e.n_root:
        raise ValueError(
            f"channel_groups(num_heads=...): some channels of {e.label} belong to no head"
        )
    e.heads_of, e.heads = head_of, n_heads


def _to_set(e: _Extracted, consumers: bool) -> GroupSet:
    members = []
    for name, dim, idx, roots, role in e.members:
        if role == "in" and not consumers:
            continue
        grp = [e.heads_of[r] for r in roots] if e.heads_of is not None else list(roots)
        order = sorted(range(len(idx)), key=lambda k: idx[k])
        members.append(
            Member(name, dim, tuple(idx[k] for k in order), tuple(grp[k] for k in order), role)
        )
    n_groups = e.heads if e.heads is not None else e.n_root
    if e.heads_of is not None:
        channels = [[] for _ in range(n_groups)]
        for r in range(e.n_root):
            channels[e.heads_of[r]].append(r)
    else:
        channels = [[r] for r in range(e.n_root)]
    return GroupSet(e.label, n_groups, tuple(members), e.heads, tuple(tuple(c) for c in channels))


def _selected(e: _Extracted, on: _select.Selector | None, index: _select.ParamIndex) -> bool:
    if on is None:
        return True
    chosen = {info.name for i, info in enumerate(index.params) if i in on.match(index)}
    return bool(e.weights) and all(w in chosen for w in e.weights)


# --------------------------------------------------------------------------- channel_groups
def channel_groups(
    model: nn.Module,
    example_inputs: Any,
    on: _select.Selector | None = None,
    *,
    consumers: bool = True,
    num_heads: Mapping[nn.Module, int] | None = None,
    root_types: Sequence[type] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    output_transform: Callable[[Any], Any] | None = None,
) -> CoupledGroups:
    """One coupled group per prunable channel of ``model``, from Torch-Pruning's dependency
    graph, ready for ``tr.GroupLasso(λ, groups=..., mode="prox")``.

    Args:
        model: the model (traced once with ``example_inputs``, in eval mode; its modes and
            BatchNorm statistics are left as they were).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        on: a ``tr.select`` selector; a dependency group is kept when the weights of all
            of its producing conv/linear layers are selected (Torch-Pruning's
            ``ignored_layers`` rule). Default: every group ``shrink`` can remove.
        consumers: include the consumers' input columns in each group (default, as
            Torch-Pruning's group importance does). ``False``: only the producing slices
            (rows, biases, norm gains/biases), so that no element is in two groups and the
            prox is the exact block soft-threshold.
        num_heads: ``{q_proj: H, k_proj: H, v_proj: H}``: the channels of one attention head
            form one group (a head is removed whole).
        root_types: module types whose output channels root a group (default conv and
            linear, as ``get_all_groups``).
        forward_fn: as Torch-Pruning's ``build_dependency``.
        output_transform: as Torch-Pruning's ``build_dependency``.

    Groups that cannot be removed exactly are left out and listed in ``.skipped`` with the
    reason (see the module docstring); naming one of them with ``on=`` raises ``ValueError``.
    """
    dg, found = _extract(
        model, example_inputs, num_heads=num_heads, root_types=root_types,
        forward_fn=forward_fn, output_transform=output_transform,
    )
    index = _select.index(model)
    sets, skipped = [], []
    for e in found:
        if not _selected(e, on, index):
            continue
        if e.reasons:
            if on is not None:
                raise ValueError(
                    f"channel_groups: the group of {e.label} (selected by on=) cannot be "
                    f"removed exactly: {'; '.join(e.reasons)}"
                )
            skipped.append((e.label, "; ".join(e.reasons)))
            continue
        if not e.members:
            continue
        sets.append(_to_set(e, consumers))
    if not sets:
        why = "; ".join(f"{lab}: {r}" for lab, r in skipped) or "none selected"
        raise ValueError(f"channel_groups: no prunable channel group in {type(model).__name__} ({why})")
    names_heads = {_module_name(dg, m): h for m, h in (num_heads or {}).items()}
    opts = {
        "consumers": consumers,
        "num_heads": names_heads,
        "root_types": tuple(root_types) if root_types else None,
        "forward_fn": forward_fn,
        "output_transform": output_transform,
    }
    return CoupledGroups(model, sets, skipped=skipped, options=opts)


# --------------------------------------------------------------------------- shrink
@dataclass
class ShrinkReport:
    """What :func:`shrink` removed.

    ``params_*``: parameter counts; ``macs_*``: multiply-accumulates of one forward of the
    example inputs, as Torch-Pruning's op counter counts them (None if it could not);
    ``removed``: layer name → output channels removed; ``layers``: layer name → ``(in
    before, in after, out before, out after)`` for every conv/linear/norm layer that
    changed; ``groups``: ``(label, groups removed, groups)`` per group set;
    ``skipped``: ``(label, reason)``; ``max_abs_diff``: the largest output difference of
    the check (None without it).
    """

    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    removed: dict[str, int]
    layers: dict[str, tuple[int, int, int, int]]
    groups: list[tuple[str, int, int]]
    skipped: list[tuple[str, str]]
    max_abs_diff: float | None = None

    @property
    def channels_removed(self) -> int:
        return sum(self.removed.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "removed": dict(self.removed),
            "layers": {k: list(v) for k, v in self.layers.items()},
            "groups": [list(g) for g in self.groups],
            "skipped": [list(s) for s in self.skipped],
            "max_abs_diff": self.max_abs_diff,
        }

    def __str__(self) -> str:
        def frac(a, b):
            return f"{a:,} -> {b:,} ({b / a:.1%})" if a else f"{a:,} -> {b:,}"

        lines = [f"params  {frac(self.params_before, self.params_after)}"]
        if self.macs_before is not None and self.macs_after is not None:
            lines.append(f"MACs    {frac(int(self.macs_before), int(self.macs_after))}")
        for name, (ib, ia, ob, oa) in self.layers.items():
            lines.append(f"  {name:<28} in {ib:>5} -> {ia:<5} out {ob:>5} -> {oa:<5}")
        for lab, reason in self.skipped:
            lines.append(f"  skipped {lab}: {reason}")
        if self.max_abs_diff is not None:
            lines.append(f"outputs unchanged: max |diff| = {self.max_abs_diff:.3g}")
        return "\n".join(lines)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs(model: nn.Module, inputs: Any, forward_fn) -> int | None:
    if forward_fn is not None:
        return None
    tp = _tp()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            macs, _ = tp.utils.count_ops_and_params(model, inputs)
        return int(macs)
    except Exception:  # the op counter does not know every model: report params only
        return None


def _dims_of(m: nn.Module) -> tuple[int, int] | None:
    for a, b in (("in_channels", "out_channels"), ("in_features", "out_features")):
        if hasattr(m, b) and isinstance(getattr(m, b), int):
            return getattr(m, a), getattr(m, b)
    for a in ("num_features", "embedding_dim", "num_parameters"):
        if isinstance(getattr(m, a, None), int):
            return getattr(m, a), getattr(m, a)
    return None


def _zero_groups(model: nn.Module, s: GroupSet) -> list[int]:
    """Groups of ``s`` whose producing slices (role "out") are all exactly zero."""
    index = _select.index(model)
    byname = {n: info.param for info in index.params for n in info.names}
    nonzero = torch.zeros(s.n_groups, dtype=torch.long)
    with torch.no_grad():
        for m in s.members:
            if m.role != "out":
                continue
            p = byname[m.name].detach()
            others = tuple(d for d in range(p.dim()) if d != m.dim)
            nz = (p != 0).any(dim=others) if others else p != 0
            nz = nz.cpu()[torch.tensor(m.index, dtype=torch.long)]
            nonzero.index_add_(0, torch.tensor(m.group, dtype=torch.long), nz.long())
    return [g for g in range(s.n_groups) if nonzero[g] == 0]


def _shrink_once(model, inputs, opts, labels) -> tuple[list, list, dict]:
    """Remove the zero groups in place; returns (groups summary, skipped, layer dims before)."""
    heads = _resolve_heads(model, opts.get("num_heads") or {})
    dg, found = _extract(
        model, inputs, num_heads=heads, root_types=opts.get("root_types"),
        forward_fn=opts.get("forward_fn"), output_transform=opts.get("output_transform"),
    )
    summary, skipped, todo = [], [], []
    for e in found:
        if labels is not None and e.label not in labels:
            continue
        if e.reasons:
            skipped.append((e.label, "; ".join(e.reasons)))
            continue
        if not e.members:
            continue
        s = _to_set(e, consumers=True)
        zero = _zero_groups(model, s)
        if len(zero) == s.n_groups:  # a layer keeps at least one (zero) channel
            zero = zero[1:]
        summary.append((s.label, len(zero), s.n_groups))
        if zero:
            idxs = sorted(r for g in zero for r in s.root_channels[g])
            todo.append((e, idxs))
    for e, idxs in todo:
        group = dg.get_pruning_group(e.root, e.root_fn, idxs)
        if not dg.check_pruning_group(group):
            skipped.append((e.label, "Torch-Pruning refuses to remove these channels"))
            continue
        group.prune()
    return summary, skipped, {}


def _resolve_heads(model: nn.Module, by_name: Mapping[Any, int]) -> dict[nn.Module, int]:
    mods = dict(model.named_modules())
    out = {}
    for k, h in by_name.items():
        if isinstance(k, nn.Module):
            out[k] = h
        elif k in mods:
            out[mods[k]] = h
        else:
            raise ValueError(f"shrink: num_heads names {k!r}, which is not a module of the model")
    return out


def _outputs(model, inputs, forward_fn) -> list[Tensor]:
    with _modes(model), torch.no_grad():
        return [t.detach().clone() for t in _tensors(_call(model, inputs, forward_fn))]


def _max_diff(a: list[Tensor], b: list[Tensor]) -> tuple[float, float]:
    """(max |a − b|, tolerance 1000·eps·max(1, max |a|)) over the output tensors."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return math.inf, 0.0
    diff, tol = 0.0, 0.0
    for x, y in zip(a, b):
        if not x.is_floating_point():
            diff = max(diff, 0.0 if torch.equal(x, y) else math.inf)
            continue
        eps = torch.finfo(x.dtype).eps
        scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
        tol = max(tol, 1000 * eps * scale)
        if x.numel():
            diff = max(diff, float((x.double() - y.double()).abs().max()))
    return diff, tol


def shrink(
    model: nn.Module,
    example_inputs: Any,
    groups: CoupledGroups | None = None,
    *,
    num_heads: Mapping[nn.Module, int] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    output_transform: Callable[[Any], Any] | None = None,
    check: bool = True,
) -> ShrinkReport:
    """Remove, in place, every channel (or head) whose coupled group is exactly zero.

    A channel is removed when every slice that *produces* it is exactly zero: its conv/linear
    rows and biases and the gain **and bias** of its BatchNorm (then the channel is 0 for
    every input, also in training mode, whatever the running statistics); its consumers'
    columns go with it. A channel with zero weights but a nonzero BatchNorm bias outputs a
    constant and is **kept**: folding that constant into the consumer's bias would be exact
    only for a consumer without zero padding. ``tr.GroupLasso(groups=channel_groups(...))``
    zeroes the whole group, biases included, so its zero channels are all removed. If every
    channel of a layer is zero, one is kept.

    Args:
        groups: a :func:`channel_groups` result: only its group sets are considered, with its
            ``num_heads`` (default: every group set of the model).
        num_heads: as for :func:`channel_groups` (when ``groups`` is not given).
        check: first shrink a copy and compare its outputs on ``example_inputs`` with the
            model's (eval mode); if they differ by more than 1000·eps·max(1, max|y|) (a
            channel that is zero but not inert: a sigmoid or a constant added after it), raise
            ``ValueError`` naming the group sets at fault and leave the model unchanged.

    Returns a :class:`ShrinkReport` (parameters and MACs before and after, channels removed
    per layer). The layers get new, smaller ``nn.Parameter`` objects: build a new optimizer
    for them, and a new grouping (``channel_groups``) and Regularizer if training goes on (a
    Regularizer built with the old grouping raises ``ValueError`` naming the changed shapes).
    """
    if groups is not None and not isinstance(groups, CoupledGroups):
        raise TypeError(f"shrink: groups must be a tr.prune.CoupledGroups, got {type(groups).__name__}")
    opts: dict[str, Any] = dict(groups.options) if groups is not None else {}
    if num_heads is not None:
        opts["num_heads"] = num_heads
    if forward_fn is not None:
        opts["forward_fn"] = forward_fn
    if output_transform is not None:
        opts["output_transform"] = output_transform
    fwd = opts.get("forward_fn")
    labels = {s.label for s in groups.sets} if groups is not None else None
    max_diff = None
    if check:
        ref = _outputs(model, example_inputs, fwd)
        trial = copy.deepcopy(model)
        summary, _, _ = _shrink_once(trial, example_inputs, opts, labels)
        diff, tol = _trial_diff(trial, example_inputs, fwd, ref)
        if not diff <= tol:
            bad = _culprits(model, example_inputs, opts, summary, ref, fwd)
            raise ValueError(
                f"shrink: removing the zero channels changes the model's outputs (max |diff| "
                f"{diff:.3g} > {tol:.3g}); the model was not changed. Group sets at fault: "
                f"{', '.join(bad) or 'unknown (only their combination)'}. Their zero channels are "
                "not inert (a sigmoid, a constant or a normalization after them); leave them "
                "out with channel_groups(on=...) and pass that grouping to shrink"
            )
        max_diff = diff
    params_before, macs_before = _count_params(model), _macs(model, example_inputs, fwd)
    dims_before = {n: _dims_of(m) for n, m in model.named_modules() if _dims_of(m) is not None}
    summary, skipped, _ = _shrink_once(model, example_inputs, opts, labels)
    layers, removed = {}, {}
    for n, m in model.named_modules():
        before, after = dims_before.get(n), _dims_of(m)
        if before is None or after is None or before == after:
            continue
        layers[n] = (before[0], after[0], before[1], after[1])
        if after[1] < before[1]:
            removed[n] = before[1] - after[1]
    return ShrinkReport(
        params_before=params_before,
        params_after=_count_params(model),
        macs_before=macs_before,
        macs_after=_macs(model, example_inputs, fwd),
        removed=removed,
        layers=layers,
        groups=summary,
        skipped=skipped,
        max_abs_diff=max_diff,
    )


def _trial_diff(trial, inputs, fwd, ref) -> tuple[float, float]:
    try:
        out = _outputs(trial, inputs, fwd)
    except Exception as e:  # the pruned copy does not even run
        raise ValueError(
            f"shrink: the model with its zero channels removed fails on the example inputs "
            f"({type(e).__name__}: {e}); the model was not changed. For attention, pass "
            "num_heads= so that whole heads are removed"
        ) from e
    return _max_diff(ref, out)


def _culprits(model, inputs, opts, summary, ref, fwd) -> list[str]:
    bad = []
    for label, n_removed, _ in summary:
        if not n_removed:
            continue
        trial = copy.deepcopy(model)
        try:
            _shrink_once(trial, inputs, opts, {label})
            diff, tol = _max_diff(ref, _outputs(trial, inputs, fwd))
        except Exception:
            diff, tol = math.inf, 0.0
        if not diff <= tol:
            bad.append(label)
    return bad
