"""The Regularizer's per-step bookkeeping (issue 16, item 2; docs/design.md §8): what does not
change between steps is cached, and the caches are never stale.

References, none of them ours:

* whether the model's parameters changed: torch's own walk, ``tuple(map(id, model.parameters()))``;
* which parameters take part in a step: ``[p.grad for p in ps]`` with ``requires_grad``;
* what a step does to a replaced parameter: the written-out ``g + λ·θ_new``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _hooks import FailOnce
from torch import nn
from torch.nn.utils import parametrize

import torch_regularizers as tr
from torch_regularizers import kernels
from torch_regularizers._attachment import Bucket
from torch_regularizers._binding import ModelWatch

LAM = 0.25


def _walk(model: nn.Module) -> tuple[int, ...]:
    return tuple(map(id, model.parameters()))


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


# --------------------------------------------------------------------------- model changes
def _set_weight(m):
    m[0].weight = nn.Parameter(torch.randn(3, 4))


def _register_new(m):
    m[2].register_parameter("extra", nn.Parameter(torch.randn(2)))


def _delete_bias(m):
    del m[0].bias


def _assign_load(m):
    m.load_state_dict({k: v.clone() for k, v in _model().state_dict().items()}, assign=True)


def _dict_write(m):  # FSDP2 and parametrizations write the dict directly (no setattr)
    m[2]._parameters["weight"] = nn.Parameter(torch.randn(2, 3))


def _replace_module(m):
    m[0] = nn.Linear(4, 3)


def _add_module(m):
    m.add_module("head", nn.Linear(2, 2))


def _parametrize(m):
    parametrize.register_parametrization(m[0], "weight", nn.Identity())


def _new_params_dict(m):
    m[2]._parameters = {k: nn.Parameter(v.detach().clone()) for k, v in m[2]._parameters.items()}


def _overwrite_on_conversion(m):  # Module._apply assigns new Parameter objects into the dict
    old = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        m.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(old)


def _swap_two(m):  # same set of tensors, another order
    w, b = m[2]._parameters["weight"], m[2]._parameters["bias"]
    m[2]._parameters["weight"], m[2]._parameters["bias"] = b, w


CHANGES = [
    _set_weight, _register_new, _delete_bias, _assign_load, _dict_write, _replace_module,
    _add_module, _parametrize, _new_params_dict, _overwrite_on_conversion, _swap_two,
]


def _no_change(m):
    pass


def _set_data(m):  # same Parameter objects: nothing to rebind
    m[0].weight.data = torch.randn(3, 4)


def _same_params_new_dict(m):
    m[0]._parameters = dict(m[0]._parameters)


def _replace_activation(m):  # the tree changes, the parameters do not
    m[1] = nn.GELU()


def _to_empty_same_device(m):  # set_data: the Parameter objects stay
    m.to_empty(device="cpu")


def _in_place(m):
    with torch.no_grad():
        m[0].weight.mul_(2)


SAME = [_no_change, _set_data, _same_params_new_dict, _replace_activation, _to_empty_same_device, _in_place]


@pytest.mark.parametrize("change", CHANGES + SAME, ids=lambda f: f.__name__.strip("_"))
def test_watch_says_changed_whenever_the_parameter_walk_changes(change):
    m = _model()
    watch = ModelWatch(m)
    before = _walk(m)
    assert not watch.changed()
    change(m)
    if _walk(m) != before:
        assert watch.changed()
    if change in SAME:
        assert _walk(m) == before  # the reference agrees these are not replacements
        if change in (_no_change, _set_data, _to_empty_same_device, _in_place):
            assert not watch.changed()
    watch.reset()
    assert not watch.changed()


def test_meta_init_then_to_empty_is_seen():
    with torch.device("meta"):
        m = _model()
    watch = ModelWatch(m)
    before = _walk(m)
    m.to_empty(device="cpu")
    assert _walk(m) != before and watch.changed()


@pytest.mark.parametrize("change", [_set_weight, _assign_load, _dict_write, _overwrite_on_conversion, _replace_module],
                         ids=lambda f: f.__name__.strip("_"))
def test_manual_apply_grad_follows_every_replacement(change, backend):
    """After a replacement the next ``apply_grad`` regularizes the model's *current* weights:
    g = g₀ + λ·θ for each (written out), and a tensor that left the model is not touched."""
    m = _model()
    reg = tr.Regularizer(m, [tr.L2(LAM, mode="grad", on=tr.select.weights)])
    old = {n: p for n, p in m.named_parameters()}
    change(m)
    for p in list(m.parameters()) + list(old.values()):
        p.grad = torch.ones_like(p)
    reg.apply_grad()
    for name, p in m.named_parameters():
        want = 1 + LAM * p.detach() if name.endswith("weight") else torch.ones_like(p)
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)
    current = {id(p) for p in m.parameters()}
    for p in old.values():
        if id(p) not in current:
            assert torch.equal(p.grad, torch.ones_like(p))


def test_repeated_calls_do_not_walk_the_model(monkeypatch):
    """Once bound, ``apply_grad``/``apply_decoupled``/``apply_prox`` do not iterate the model's
    parameters or modules (the cost this cache removes: ~0.5 µs per parameter per call)."""
    m = nn.Sequential(*[nn.Linear(8, 8) for _ in range(20)])
    reg = tr.Regularizer(m, [tr.L2(LAM, mode="grad", on=tr.select.weights),
                             tr.L1(LAM, mode="prox", on=tr.select.biases)])
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    calls = []
    for name in ("parameters", "named_parameters", "modules", "named_modules", "children"):
        orig = getattr(nn.Module, name)

        def counting(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(nn.Module, name, counting)
    for _ in range(5):
        reg.apply_grad()
        reg.apply_prox(lr=0.1)
    assert calls == []
    m[0].weight = nn.Parameter(torch.randn(8, 8))  # a replacement is still noticed
    reg.apply_grad()
    assert calls


# --------------------------------------------------------------------------- live parameters
def _params(n=5):
    ps = [nn.Parameter(torch.randn(3)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(3)
    return ps


def _reference_live(ps):
    keep = [p for p in ps if p.grad is not None and p.requires_grad]
    return keep, [p.grad for p in keep]


def _missing_grad(ps):
    ps[2].grad = None


def _frozen(ps):
    ps[0].requires_grad_(False)


def _frozen_without_grad(ps):
    ps[4].requires_grad_(False)
    ps[4].grad = None


def _all_missing(ps):
    for p in ps:
        p.grad = None


@pytest.mark.parametrize("edit", [_no_change, _missing_grad, _frozen, _frozen_without_grad, _all_missing],
                         ids=lambda f: f.__name__.strip("_"))
def test_live_is_the_trainable_parameters_with_a_gradient(edit, backend):
    ps = _params()
    edit(ps)
    bk = Bucket(binding=None, group=None, group_index=0, params=ps)
    live_ps, live_gs = bk.live()
    want_ps, want_gs = _reference_live(ps)
    assert [id(p) for p in live_ps] == [id(p) for p in want_ps]
    assert [id(g) for g in live_gs] == [id(g) for g in want_gs]  # the very .grad objects
    assert [id(p) for p in bk.trainable()] == [id(p) for p in ps if p.requires_grad]


def test_live_grads_native_matches_python_including_grads_autograd_made(native_mod):
    """Grads created by backward (no Python object before) come back as the same objects
    ``p.grad`` returns, for a list of thousands of tensors."""
    lin = [nn.Linear(3, 3) for _ in range(600)]
    ps = [p for m in lin for p in m.parameters()]
    sum(m(torch.ones(1, 3)).sum() for m in lin).backward()
    fast = native_mod.live_grads(ps)
    assert fast is not None and len(fast) == len(ps)
    assert all(a is p.grad for a, p in zip(fast, ps))
    assert native_mod.live_grads([]) == []
    assert native_mod.all_trainable(ps) and native_mod.all_trainable([])
    ps[-1].requires_grad_(False)
    assert native_mod.live_grads(ps) is False and native_mod.all_trainable(ps) is False
    ps[-1].requires_grad_(True)
    ps[0].grad = None
    assert native_mod.live_grads(ps) is False and native_mod.all_trainable(ps) is True
    # an item that is not an exact Tensor/Parameter: "ask Python" (None), whatever else
    sub = _TracedParam(torch.randn(3))
    sub.grad = torch.ones(3)
    for helper in (native_mod.live_grads, native_mod.all_trainable, native_mod.versions):
        assert helper([sub]) is None and helper([*ps[1:], sub]) is None
        assert helper([ps[1], 3]) is None


class _TracedParam(nn.Parameter):
    """A parameter subclass whose attribute reads go through ``__torch_function__``."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "__get__":
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclass_parameters_read_grad_through_torch_function(backend):
    p = _TracedParam(torch.randn(3))
    p.grad = torch.ones(3)
    bk = Bucket(binding=None, group=None, group_index=0, params=[p])
    before = _TracedParam.reads
    ps, gs = bk.live()
    assert ps == [p] and gs[0] is p.grad
    assert _TracedParam.reads > before  # went through the subclass, not around it


def test_regularizer_trains_subclass_parameters_like_plain_ones(backend):
    """The same step on ``_TracedParam`` and plain parameters: identical weights."""
    out = []
    for cls in (nn.Parameter, _TracedParam):
        m = _model()
        m[0].weight = cls(m[0].weight.detach().clone())
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        tr.Regularizer(m, [tr.L1(LAM, mode="grad", on=tr.select.weights)]).attach(opt)
        m(torch.ones(2, 4)).sum().backward()
        opt.step()
        out.append(copy.deepcopy({k: v.detach() for k, v in m.state_dict().items()}))
    for k in out[0]:
        torch.testing.assert_close(out[0][k], out[1][k], rtol=0, atol=0)


# --------------------------------------------------------------------------- retry record
def test_versions_are_the_version_counters(backend):
    ps = _params(300)
    for i, p in enumerate(ps):
        with torch.no_grad():
            for _ in range(i % 7):
                p.add_(1)
    got = kernels.versions(ps)
    assert list(got) == [p._version for p in ps]
    assert list(kernels.versions([])) == []


@pytest.mark.parametrize("touch", [False, True], ids=["retried", "grads-recomputed"])
def test_retried_step_regularizes_each_gradient_once(backend, touch):
    """A step that fails after our pre-hook and is retried equals one torch SGD step with
    ``weight_decay`` (λ·θ added once); gradients recomputed between the two attempts (their
    version moved) are regularized again, as fresh gradients must be."""
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(3, 3) for _ in range(40)])
    ref = copy.deepcopy(m)
    x = torch.randn(2, 3)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, weight_decay=LAM, foreach=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, foreach=True)
    tr.Regularizer(m, [tr.L2(LAM, mode="grad", on=tr.select.all)]).attach(opt)
    opt.register_step_pre_hook(FailOnce())  # runs after ours, before the update
    for net in (ref, m):
        net(x).square().sum().backward()
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    if touch:
        opt.zero_grad(set_to_none=False)
        m(x).square().sum().backward()
    opt.step()
    opt_ref.step()
    for a, b in zip(m.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_an_active_torch_function_mode_sees_the_grad_reads(backend):
    """Under a ``TorchFunctionMode`` the live lists are read through Python (the mode sees
    every ``.grad`` read), with the same result."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        reads = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "__get__":
                Count.reads += 1
            return func(*args, **(kwargs or {}))

    ps = _params(4)
    bk = Bucket(binding=None, group=None, group_index=0, params=ps)
    with Count():
        live_ps, live_gs = bk.live()
    assert [id(p) for p in live_ps] == [id(p) for p in ps]
    assert Count.reads >= len(ps)
    assert [id(g) for g in live_gs] == [id(p.grad) for p in ps]


def test_a_reassigned_model_is_followed(backend):
    """``reg.model = other`` (same architecture): the next call regularizes ``other``."""
    a, b = _model(), _model()
    reg = tr.Regularizer(a, [tr.L2(LAM, mode="grad", on=tr.select.weights)])
    reg.model = b
    for p in list(a.parameters()) + list(b.parameters()):
        p.grad = torch.ones_like(p)
    reg.apply_grad()
    for name, p in b.named_parameters():
        want = 1 + LAM * p.detach() if name.endswith("weight") else torch.ones_like(p)
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in a.parameters())
