"""Presets on real architectures (issue 10): what practitioners decay on timm, Hugging Face
and torchvision models, and the default groups of group rules on transposed layouts.

References are independent of the library: Hugging Face's own
``Trainer.get_decay_parameter_names`` on real ``transformers`` model classes built from tiny
configs (no downloads); names written out by hand from timm's / torchvision's conventions on
modules written here in their style (neither package imports with the CPU torch of this
environment); and group norms written out column by column with plain indexing.
"""

from __future__ import annotations

import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

import torch_regularizers as tr
from torch_regularizers import select as S

D = 8


def names(sel, model):
    return [n for n, _ in sel.resolve(model)]


def layer_weights(model, types=(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d), extra=(), skip=()):
    """The weights a practitioner decays, found independently of the presets: the ``weight``
    of every module of these types (and of the classes named in ``extra``, e.g. HF
    ``Conv1D``), minus a head tied to an embedding and names containing one of ``skip``."""
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    out = []
    for mname, m in model.named_modules():
        if isinstance(m, types) or type(m).__name__ in extra:
            w = m._parameters.get("weight")
            if w is not None and id(w) not in emb:
                n = f"{mname}.weight" if mname else "weight"
                if not any(s in n for s in skip):
                    out.append(n)
    return sorted(out)


# =========================================================================== timm-style modules
class PositionalEncodingFourier(nn.Module):
    """timm XCiT: the positional encoding is a module with a conv projection."""

    def __init__(self):
        super().__init__()
        self.token_projection = nn.Conv2d(2 * 4, D, kernel_size=1)


class XCA(nn.Module):
    """timm XCiT cross-covariance attention: ``temperature`` (heads, 1, 1) is declared
    no-decay by the attention module itself, relative to it."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(2, 1, 1))
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def no_weight_decay(self):
        return {"temp*"}


class XCiTStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, D, 4, 4)
        self.pos_embed = PositionalEncodingFourier()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.norm1 = nn.LayerNorm(D)
        self.attn = XCA()
        self.head = nn.Linear(D, 10)

    def no_weight_decay(self):
        return {"pos_embed.*", "cls_token"}  # fnmatch patterns, as timm applies them


def test_no_weight_decay_entries_are_fnmatch_patterns_relative_to_their_module():
    """Point 1: ``pos_embed.*`` excludes every parameter of the ``pos_embed`` module; a
    submodule's ``temp*`` matches relative to that submodule."""
    m = XCiTStyle()
    assert names(tr.select.tokens, m) == [
        "cls_token",
        "pos_embed.token_projection.weight",
        "pos_embed.token_projection.bias",
        "attn.temperature",
    ]
    assert names(tr.select.weights, m) == [
        "patch_embed.weight",
        "attn.qkv.weight",
        "attn.proj.weight",
        "head.weight",
    ]


class Legacy(nn.Module):
    """Exact names and a prefix ending at a dot keep working; a bare name is not a prefix."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Parameter(torch.zeros(D, D))
        self.extra_b = nn.Parameter(torch.zeros(D, D))
        self.gate = nn.Linear(D, D)
        self.keep = nn.Linear(D, D)
        self.table_1 = nn.Parameter(torch.zeros(D, D))
        self.table_2 = nn.Parameter(torch.zeros(D, D))

    def no_weight_decay(self):
        return ["extra", "gate.", "table_[12]"]


def test_no_weight_decay_exact_prefix_and_character_class():
    assert names(tr.select.weights, Legacy()) == ["extra_b", "keep.weight"]


class Holder(nn.Module):
    def __init__(self, child):
        super().__init__()
        self.child = child
        self.fc = nn.Linear(D, D)


def _nwd_module(result):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(D, D))

        def no_weight_decay(self):
            if isinstance(result, Exception):
                raise result
            return result

    return Odd()


class NeedsArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(D, D))

    def no_weight_decay(self, prefix):  # needs an argument
        return {prefix + "w"}


@pytest.mark.parametrize(
    "child",
    [
        pytest.param(lambda: _nwd_module(None), id="None"),
        pytest.param(lambda: _nwd_module(3), id="int"),
        pytest.param(lambda: _nwd_module([1, 2]), id="non-strings"),
        pytest.param(lambda: _nwd_module(RuntimeError("boom")), id="raises"),
        pytest.param(NeedsArgs, id="needs-args"),
    ],
)
def test_unusable_no_weight_decay_is_ignored_with_one_warning(child):
    """Point 2: it warned once naming the module, and nothing crashes (a name-only rule
    neither); its parameters are then judged by the presets alone."""
    model = Holder(child())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        reg = tr.Regularizer(model, [tr.L2(1e-2, on=tr.select.name("fc.*"))])
    ours = [w for w in rec if "no_weight_decay" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in rec]
    assert issubclass(ours[0].category, UserWarning)
    assert "child" in str(ours[0].message) and type(model.child).__name__ in str(ours[0].message)
    fc = model.fc
    want = 0.5e-2 * float((fc.weight.detach() ** 2).sum() + (fc.bias.detach() ** 2).sum())
    assert reg.value().item() == pytest.approx(want)
    with pytest.warns(UserWarning, match="no_weight_decay"):
        assert names(tr.select.weights, model) == ["child.w", "fc.weight"]


def test_a_string_result_is_one_pattern_and_stray_entries_are_dropped():
    m = Holder(_nwd_module("w"))
    assert names(tr.select.tokens, m) == ["child.w"]
    m = Holder(_nwd_module(["w", None]))
    with pytest.warns(UserWarning, match="child .*None"):
        assert names(tr.select.tokens, m) == ["child.w"]


# --------------------------------------------------------------------------- relative positions
class SwinAttention(nn.Module):
    """torchvision ``ShiftedWindowAttention`` (swin_t) / timm Swin ``WindowAttention``."""

    def __init__(self, heads=2, ws=2):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))


class SwinV2Attention(nn.Module):
    """torchvision ``ShiftedWindowAttentionV2`` / timm SwinV2: ``logit_scale`` (heads, 1, 1)
    and the continuous position bias MLP ``cpb_mlp``."""

    def __init__(self, heads=2):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, heads, bias=False))


class MaxViTAttention(nn.Module):
    """torchvision ``RelativePositionalMultiHeadAttention`` (maxvit_t)."""

    def __init__(self):
        super().__init__()
        self.to_qkv = nn.Linear(D, 3 * D)
        self.merge = nn.Linear(D, D)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(2, 9, 9))


class BeitStyleBias(nn.Module):
    """timm BEiT keeps a shared ``rel_pos_bias`` module; some models name the tensor itself."""

    def __init__(self):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(12, 2))
        self.rel_pos_bias = nn.Parameter(torch.zeros(2, 4, 4))
        self.attn_relative_position_bias = nn.Parameter(torch.zeros(2, 4, 4))


class VisionTransformers(nn.Module):
    def __init__(self):
        super().__init__()
        self.swin = SwinAttention()
        self.swinv2 = SwinV2Attention()
        self.maxvit = MaxViTAttention()
        self.beit = BeitStyleBias()
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 10)


def test_relative_position_tables_and_logit_scale_are_tokens():
    """Point 3: torchvision/timm/HF exclude relative position tables; SwinV2's cpb MLP and
    logit scales are no-decay too."""
    m = VisionTransformers()
    assert names(tr.select.tokens, m) == [
        "swin.relative_position_bias_table",
        "swinv2.logit_scale",
        "swinv2.cpb_mlp.0.weight",
        "swinv2.cpb_mlp.0.bias",
        "swinv2.cpb_mlp.2.weight",
        "maxvit.relative_position_bias_table",
        "beit.relative_position_bias_table",
        "beit.rel_pos_bias",
        "beit.attn_relative_position_bias",
    ]
    assert names(tr.select.weights, m) == [
        "swin.qkv.weight",
        "swin.proj.weight",
        "swinv2.qkv.weight",
        "swinv2.proj.weight",
        "maxvit.to_qkv.weight",
        "maxvit.merge.weight",
        "head.weight",
    ]


class TimmViTWithRegisters(nn.Module):
    """timm ``VisionTransformer(reg_tokens=4)`` keeps them in ``reg_token`` (1, 4, d)."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.reg_token = nn.Parameter(torch.zeros(1, 4, D))
        self.register_tokens = nn.Parameter(torch.zeros(1, 4, D))
        self.memory_tokens = nn.Parameter(torch.zeros(1, 2, D))
        self.num_tokens_proj = nn.Linear(D, D)  # "tokens" inside a name: still a weight
        self.head = nn.Linear(D, 10)


def test_plural_tokens():
    """Point 4: ``*_tokens`` are tokens, as ``*_token`` are."""
    m = TimmViTWithRegisters()
    assert names(tr.select.tokens, m) == ["cls_token", "reg_token", "register_tokens", "memory_tokens"]
    assert names(tr.select.weights, m) == ["num_tokens_proj.weight", "head.weight"]


# --------------------------------------------------------------------------- norm class names
def _module_class(name, param_shape=(D,)):
    def init(self):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.ones(*param_shape))

    return type(name, (nn.Module,), {"__init__": init})


NORM_LIKE = ["FooRMSNormGated", "RmsNormGated", "LayerNorm2d", "BatchNormAct2d", "NemotronLayerNorm1P",
             "Qwen2_5_OmniAdaLayerNormZero_Final", "GroupNorm1", "SimpleNorm"]
NOT_NORM = ["Normal", "Normalizer", "NormalizedLinear", "Abnormality", "ConvNormLayer",
            "Wav2Vec2GroupNormConvLayer", "RobertaPreLayerNormLMHead", "NormMlpClassifierHead"]


def test_norm_is_a_camel_case_word_of_the_class_name():
    """Point 5: gated RMSNorms (and ``...Norm2d``, ``...NormAct2d``) are norms; ``Normal``,
    ``Normalizer`` and blocks that merely contain a norm in their name are not."""
    model = nn.Module()
    for n in NORM_LIKE + NOT_NORM:
        setattr(model, n.lower(), _module_class(n, (D, D))())
    assert names(tr.select.norms, model) == [f"{n.lower()}.weight" for n in NORM_LIKE]
    assert names(tr.select.weights, model) == [f"{n.lower()}.weight" for n in NOT_NORM]


# =========================================================================== lazy and complex
class LazyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.lazy = nn.LazyLinear(3)

    def forward(self, x):
        return self.lazy(self.fc(x))


def test_lazy_parameters_raise_our_error_naming_the_module():
    m = LazyNet()
    for build in (lambda: tr.select.weights.resolve(m),
                  lambda: tr.Regularizer(m, [tr.L2(1e-3, on=tr.select.name("fc.*"))])):
        with pytest.raises(ValueError, match="forward") as e:
            build()
        msg = str(e.value)
        assert "lazy" in msg and "LazyLinear" in msg and "lazy.weight" in msg and "lazy.bias" in msg
        assert "Attempted to use an uninitialized parameter" not in msg
    m(torch.randn(2, 4))  # one forward: now it works
    assert names(tr.select.weights, m) == ["fc.weight", "lazy.weight"]


class ComplexNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.spectral = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
        self.phase = nn.Parameter(torch.randn(4, dtype=torch.complex128))


def test_check_selectable_names_complex_parameters():
    m = ComplexNet()
    idx = S.index(m)
    S.check_selectable("l2", [i for i in idx.params if i.name.startswith("fc.")])  # real: fine
    with pytest.raises(ValueError) as e:
        S.check_selectable("l2", idx.params)
    msg = str(e.value)
    assert "'l2'" in msg and "complex" in msg and "spectral" in msg and "phase" in msg
    assert "fc.weight" not in msg
    # lazy infos built by hand are refused too
    lazy = LazyNet()
    info = S.ParamInfo("lazy.weight", lazy.lazy.weight, lazy.lazy)
    with pytest.raises(ValueError, match="forward"):
        S.check_selectable("l1", [info])


def test_regularizer_refuses_a_selected_complex_parameter_and_ignores_an_unselected_one():
    m = ComplexNet()
    with pytest.raises(ValueError, match="spectral"):
        tr.Regularizer(m, [tr.L2(1e-3, on=tr.select.all)])
    reg = tr.Regularizer(m, [tr.L2(1e-3, on=tr.select.name("fc.*"))])  # contains one: fine
    want = 0.5e-3 * float((m.fc.weight.detach() ** 2).sum() + (m.fc.bias.detach() ** 2).sum())
    assert reg.value().item() == pytest.approx(want)


# =========================================================================== group axis (point 7)
def col_norms(w):
    return torch.stack([torch.sqrt((w[:, j] ** 2).sum()) for j in range(w.shape[1])])


def dim1_norms(w):
    """Norm of ``w[:, o]`` for every ``o`` (everything but dim 1 reduced), by indexing."""
    return torch.stack([torch.sqrt((w[:, o] ** 2).sum()) for o in range(w.shape[1])])


def dim1_prox(w, thr):
    out = w.clone()
    for o in range(w.shape[1]):
        n = torch.sqrt((w[:, o] ** 2).sum())
        out[:, o] = w[:, o] * max(0.0, 1 - thr / float(n)) if n > 0 else 0
    return out


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.up1 = nn.ConvTranspose1d(3, 4, 3)
        self.up2 = nn.ConvTranspose2d(3, 5, 2)
        self.up3 = nn.ConvTranspose3d(2, 3, 2)


def spread(w, top):
    """Scale ``w[:, o]`` so the output groups' norms run evenly from near 0 to ``top``."""
    with torch.no_grad():
        s = torch.linspace(0.01, top, w.shape[1]).reshape((1, -1) + (1,) * (w.dim() - 2))
        w.mul_(s / dim1_norms(w).reshape(s.shape))


def test_default_groups_follow_the_layer_type_conv_transpose(impl_kw):
    torch.manual_seed(0)
    m = Transposed()
    lam = 0.3
    for up in (m.up1, m.up2, m.up3):
        spread(up.weight, 2 * lam * math.sqrt(up.weight[:, 0].numel()))  # about half are zeroed
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    rule = tr.GroupLasso(lam, mode="prox", on=tr.select.weights)
    reg = tr.Regularizer(m, [rule], **impl_kw)
    # value: ConvTranspose groups are w[:, o] (size in·k...), Linear groups are rows
    want = lam * math.sqrt(6) * float(before["lin.weight"].norm(dim=1).sum())
    for n in ("up1", "up2", "up3"):
        w = before[f"{n}.weight"]
        want += lam * math.sqrt(w[:, 0].numel()) * float(dim1_norms(w).sum())
    assert reg.value().item() == pytest.approx(want, rel=1e-5)
    reg.apply_prox(lr=1.0)
    for n in ("up1", "up2", "up3"):
        w = before[f"{n}.weight"]
        exp = dim1_prox(w, lam * math.sqrt(w[:, 0].numel()))
        got = getattr(m, n).weight.detach()
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-7)
        zero_out = [o for o in range(w.shape[1]) if bool((got[:, o] == 0).all())]
        assert zero_out and len(zero_out) < w.shape[1], n  # whole output channels, not all
        assert not any(bool((got[i] == 0).all()) for i in range(w.shape[0])), n  # no input channel
    wl = before["lin.weight"]
    thr = lam * math.sqrt(6)
    exp_lin = wl * (1 - thr / wl.norm(dim=1, keepdim=True)).clamp_min(0)
    torch.testing.assert_close(m.lin.weight.detach(), exp_lin, rtol=1e-5, atol=1e-7)


def _tf():
    return pytest.importorskip("transformers")


def tiny_gpt2(seed=0):
    T = _tf()
    cfg = T.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return T.GPT2LMHeadModel(cfg)


def conv1d_weights(model):
    return [(n, mod.weight) for n, mod in model.named_modules() if type(mod).__name__ == "Conv1D"]


@pytest.mark.parametrize("kind", ["group_lasso", "sparse_group_lasso"])
def test_gpt2_conv1d_group_lasso_zeroes_whole_columns(kind, impl_kw):
    """HF ``Conv1D`` weight is (in, out): the default groups are its columns (output units)."""
    m = tiny_gpt2()
    convs = conv1d_weights(m)
    assert len(convs) == 4
    with torch.no_grad():
        for _, w in convs:
            s = torch.linspace(0.02, 1.0, w.shape[1])
            w.mul_(s / col_norms(w))
    before = [w.detach().clone() for _, w in convs]
    lam, rho = 0.05, 0.2
    on = tr.select.name("*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight")
    if kind == "group_lasso":
        rule, lam_g, l1 = tr.GroupLasso(lam, mode="prox", on=on), lam, 0.0
    else:
        rule, lam_g, l1 = tr.SparseGroupLasso(lam, l1_ratio=rho, mode="prox", on=on), lam * (1 - rho), lam * rho
    reg = tr.Regularizer(m, [rule], **impl_kw)
    want = sum(l1 * float(w.abs().sum()) + lam_g * math.sqrt(w.shape[0]) * float(col_norms(w).sum()) for w in before)
    assert reg.value().item() == pytest.approx(want, rel=1e-5)
    reg.apply_prox(lr=1.0)
    zero_cols = 0
    for (n, w), w0 in zip(convs, before):
        x = w0 - w0.clamp(-l1, l1)  # soft-threshold (SparseGroupLasso's L1 part), then columns
        thr = lam_g * math.sqrt(w0.shape[0])
        cn = col_norms(x)
        exp = torch.stack(
            [x[:, j] * max(0.0, 1 - thr / float(cn[j])) if cn[j] > 0 else 0 * x[:, j] for j in range(x.shape[1])],
            dim=1,
        )
        torch.testing.assert_close(w.detach(), exp, rtol=1e-5, atol=1e-7)
        zc = sum(bool((w[:, j] == 0).all()) for j in range(w.shape[1]))
        assert 0 < zc < w.shape[1], n
        assert not any(bool((w[i] == 0).all()) for i in range(w.shape[0])), n  # rows (inputs) survive
        zero_cols += zc
    assert reg.stats()[f"{rule.default_name}/zero_groups"] == zero_cols


@pytest.mark.parametrize("mode", ["grad", "decoupled"])
def test_gpt2_conv1d_group_lasso_gradient_is_columnwise_in_an_optimizer_step(mode, impl_kw):
    """The hot path of an attached optimizer: ∇R of column j is λ√in·w[:, j]/‖w[:, j]‖."""
    m = tiny_gpt2()
    w = m.transformer.h[0].attn.c_proj.weight  # (16, 16): rows and columns differ only by values
    w0 = w.detach().clone()
    lam, lr = 0.01, 0.5
    reg = tr.Regularizer(m, [tr.GroupLasso(lam, mode=mode, on=tr.select.name("*.attn.c_proj.weight"))], **impl_kw)
    opt = torch.optim.SGD([w], lr=lr)
    w.grad = torch.zeros_like(w)
    reg.attach(opt)
    opt.step()
    reg.detach()
    want = w0 - lr * lam * 4 * w0 / col_norms(w0)
    torch.testing.assert_close(w.detach(), want, rtol=1e-5, atol=1e-7)


def test_gpt2_conv1d_max_norm_and_unit_norm_bound_columns():
    m = tiny_gpt2()
    torch.manual_seed(1)
    with torch.no_grad():
        for _, w in conv1d_weights(m):
            w.normal_(0, 1.0)
    w0 = m.transformer.h[0].mlp.c_fc.weight.detach().clone()  # (16, 64)
    cap = float(col_norms(w0).median())
    on = tr.select.name("*.mlp.c_fc.weight")
    rule = tr.MaxNorm(cap, on=on)
    reg = tr.Regularizer(m, [rule])
    reg.apply_prox(lr=1.0)
    w = m.transformer.h[0].mlp.c_fc.weight.detach()
    n0 = col_norms(w0)
    for j in range(w.shape[1]):
        if n0[j] > cap:
            torch.testing.assert_close(w[:, j], w0[:, j] * cap / (float(n0[j]) + rule.eps), rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(w[:, j], w0[:, j])
    assert (n0 > cap).any() and (n0 <= cap).any()
    m2 = tiny_gpt2()
    reg2 = tr.Regularizer(m2, [tr.UnitNorm(on=tr.select.name("*.attn.c_attn.weight"))])
    reg2.apply_prox(lr=1.0)
    torch.testing.assert_close(col_norms(m2.transformer.h[0].attn.c_attn.weight.detach()),
                               torch.ones(48), rtol=1e-5, atol=1e-5)


def test_conv_transpose_unit_norm_and_explicit_dim_untouched():
    torch.manual_seed(0)
    m = Transposed()
    reg = tr.Regularizer(m, [tr.UnitNorm(on=tr.select.modules(nn.ConvTranspose2d) & tr.select.weights)])
    reg.apply_prox(lr=1.0)
    torch.testing.assert_close(dim1_norms(m.up2.weight.detach()), torch.ones(5), rtol=1e-5, atol=1e-5)
    # an explicit dim is used as given: dim=(1, 2, 3) groups by input channel (dim 0)
    torch.manual_seed(0)
    m = Transposed()
    tr.Regularizer(m, [tr.UnitNorm(dim=(1, 2, 3), on=tr.select.modules(nn.ConvTranspose2d) & tr.select.weights)]).apply_prox(lr=1.0)
    w = m.up2.weight.detach()
    torch.testing.assert_close(torch.stack([w[i].norm() for i in range(3)]), torch.ones(3), rtol=1e-5, atol=1e-5)


def test_bound_layout_also_reaches_the_single_tensor_api_and_copies():
    """After binding, ``value``/``grad``/``prox`` on the parameter (or a copy of it, as the
    fp32 working copy of stochastic rounding is) group by columns; unbound: rows, as before."""
    m = tiny_gpt2()
    w = m.transformer.h[0].mlp.c_fc.weight  # (16, 64)
    lam = 0.1
    thr = lam * math.sqrt(16)
    with torch.no_grad():
        w.mul_(torch.linspace(0.01, 2 * thr, 64) / col_norms(w))
    w0 = w.detach().clone()
    fresh = tr.GroupLasso(lam)
    rows = lam * math.sqrt(64) * float(w0.norm(dim=1).sum())
    assert fresh.value(w).item() == pytest.approx(rows, rel=1e-5)  # never bound: today's default
    rule = tr.GroupLasso(lam, on=tr.select.name("*.c_fc.weight"))
    tr.Regularizer(m, [rule])
    cols = lam * math.sqrt(16) * float(col_norms(w0).sum())
    assert rule.value(w).item() == pytest.approx(cols, rel=1e-5)
    assert rule.value(w0).item() == pytest.approx(cols, rel=1e-5)  # a copy of the parameter
    torch.testing.assert_close(rule.grad(w), thr * w0 / col_norms(w0), rtol=1e-5, atol=1e-7)
    p = rule.prox(w, 1.0)
    exp = torch.stack([w0[:, j] * max(0.0, 1 - thr / float(col_norms(w0)[j])) for j in range(64)], dim=1)
    torch.testing.assert_close(p, exp, rtol=1e-5, atol=1e-7)
    assert 0 < sum(bool((p[:, j] == 0).all()) for j in range(64)) < 64
    assert torch.equal(w.detach(), w0)  # prox() returns a new tensor


def test_bind_without_modules_keeps_the_generic_default():
    conv = nn.ConvTranspose2d(3, 5, 2)
    rule = tr.GroupLasso(1.0)
    rule._bind(["w"], [conv.weight])
    assert rule._dims(conv.weight) == (1, 2, 3)
    rule2 = tr.GroupLasso(1.0)
    rule2._bind(["w"], [conv.weight], [conv])
    assert rule2._dims(conv.weight) == (0, 2, 3)
    assert rule2._dims(conv.bias) == (0,)  # a 1-D bias: one group
    rule3 = tr.MaxNorm(1.0, dim=1)
    rule3._bind(["w"], [conv.weight], [conv])
    assert rule3._dims(conv.weight) == (1,)


def test_stochastic_rounding_bf16_conv1d_prox_zeroes_columns():
    m = tiny_gpt2().to(torch.bfloat16)
    w = m.transformer.h[0].mlp.c_fc.weight
    with torch.no_grad():
        w.copy_((torch.randn(16, 64) * torch.linspace(0.02, 1.0, 64)).to(torch.bfloat16))
    rule = tr.GroupLasso(0.5, mode="prox", on=tr.select.name("*.mlp.c_fc.weight"), stochastic_rounding=True)
    reg = tr.Regularizer(m, [rule])
    reg.apply_prox(lr=1.0)
    zc = [j for j in range(64) if bool((w[:, j] == 0).all())]
    assert 0 < len(zc) < 64
    assert not any(bool((w[i] == 0).all()) for i in range(16))


# =========================================================================== Hugging Face
TXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
HF_CONFIGS = {
    "bert": ("BertConfig", "BertForMaskedLM", dict(TXT, max_position_embeddings=32)),
    "gpt2-tied": ("GPT2Config", "GPT2LMHeadModel",
                  dict(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)),
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", dict(TXT, num_key_value_heads=2, max_position_embeddings=32)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM",
                   dict(TXT, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(TXT, num_key_value_heads=2, max_position_embeddings=32)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(TXT, num_key_value_heads=2, max_position_embeddings=32)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(TXT, num_key_value_heads=2, max_position_embeddings=32, head_dim=8)),
    "qwen3-next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, linear_num_value_heads=2,
                        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2,
                        num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                        layer_types=["linear_attention", "full_attention"])),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(TXT, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8,
                 patch_size=4, num_labels=3)),
    "clip": ("CLIPConfig", "CLIPModel",
             dict(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                   eos_token_id=1, pad_token_id=1),
                  vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=8, patch_size=4),
                  projection_dim=8)),
    "siglip": ("SiglipConfig", "SiglipModel",
               dict(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                     eos_token_id=1, pad_token_id=1),
                    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=8, patch_size=4))),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                dict(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                     max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, decoder_start_token_id=1)),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM",
                   dict(vocab_size=64, dim=16, hidden_dim=32, n_layers=1, n_heads=2, max_position_embeddings=32)),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForMaskedLM",
                   dict(TXT, max_position_embeddings=32, relative_attention=True, position_buckets=8,
                        pos_att_type=["p2c", "c2p"])),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)),
    "mamba": ("MambaConfig", "MambaForCausalLM",
              dict(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=2)),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM",
               dict(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=2,
                    num_heads=4, head_dim=8, n_groups=1)),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2ForCTC",
                 dict(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, conv_dim=(8, 8), conv_stride=(2, 2), conv_kernel=(3, 3),
                      num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM",
                   dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=2,
                        bos_token_id=1, cls_token_id=1, sep_token_id=2)),
    "swin": ("SwinConfig", "SwinForImageClassification",
             dict(image_size=8, patch_size=2, embed_dim=8, depths=[1], num_heads=[2], window_size=2, num_labels=3)),
    "swinv2": ("Swinv2Config", "Swinv2ForImageClassification",
               dict(image_size=8, patch_size=2, embed_dim=8, depths=[1], num_heads=[2], window_size=2, num_labels=3)),
    "beit": ("BeitConfig", "BeitForImageClassification",
             dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8,
                  patch_size=4, use_relative_position_bias=True, num_labels=3)),
    "dinov2-registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                         dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4,
                              num_register_tokens=2, mlp_ratio=2)),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification",
                 dict(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)),
}


def hf_model(key):
    T = _tf()
    cfg_name, model_name, kw = HF_CONFIGS[key]
    if getattr(T, cfg_name, None) is None or getattr(T, model_name, None) is None:
        pytest.skip(f"{model_name} is not in the installed transformers {T.__version__}")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(T, model_name)(getattr(T, cfg_name)(**kw))


@pytest.fixture(scope="module")
def hf_trainer(tmp_path_factory):
    """One real Trainer: its ``get_decay_parameter_names`` is the reference for every model."""
    T = _tf()
    pytest.importorskip("accelerate")
    args = T.TrainingArguments(output_dir=str(tmp_path_factory.mktemp("hf")), report_to=[], use_cpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.Trainer(model=nn.Linear(2, 2), args=args)


@pytest.mark.parametrize("key", list(HF_CONFIGS))
def test_decay_parameter_names_equals_the_installed_trainer(key, hf_trainer):
    """Point 6: name for name and in order, what the Trainer itself decays."""
    from torch_regularizers.integrations.transformers import decay_parameter_names

    model = hf_model(key)
    assert decay_parameter_names(model) == hf_trainer.get_decay_parameter_names(model)


def test_decay_parameter_names_hf_cases_by_name(hf_trainer):
    """The cases the issue names, spelled out: HF spares anything with "bias" in its name and
    gated norms by their ``norm`` name part."""
    from torch_regularizers.integrations.transformers import decay_parameter_names

    t5 = decay_parameter_names(hf_model("t5"))
    assert not any("relative_attention_bias" in n for n in t5)
    for key in ("swin", "beit"):
        assert not any("relative_position_bias_table" in n for n in decay_parameter_names(hf_model(key)))
    assert not any("continuous_position_bias_mlp" in n for n in decay_parameter_names(hf_model("swinv2")))
    assert "backbone.layers.0.mixer.norm.weight" not in decay_parameter_names(hf_model("mamba2"))
    assert "model.layers.0.linear_attn.norm.weight" not in decay_parameter_names(hf_model("qwen3-next"))


def test_library_convention_through_no_decay_differs_on_purpose():
    """``no_decay=~tr.select.weights``: the library's convention (embeddings, tokens and
    relative tables spared), listed under the Trainer's names."""
    from torch_regularizers.integrations.transformers import decay_parameter_names

    m = hf_model("dinov2-registers")
    got = set(decay_parameter_names(m, no_decay=~tr.select.weights))
    assert got == set(layer_weights(m))
    assert "embeddings.register_tokens" in decay_parameter_names(m)  # the Trainer decays it


# --------------------------------------------------------------------------- HF presets
def test_hf_relative_position_tables_and_logit_scales_are_not_weights():
    """Point 3 on real HF classes: Swin/BEiT tables, SwinV2 cpb MLP and logit scale, CLIP/SigLIP
    logit scale are tokens; the weights are exactly the Linear/Conv weights."""
    for key in ("swin", "beit"):
        m = hf_model(key)
        tables = [n for n, _ in m.named_parameters() if n.endswith("relative_position_bias_table")]
        assert tables, key
        assert set(tables) <= set(names(tr.select.tokens, m)), key
        assert sorted(names(tr.select.weights, m)) == layer_weights(m), key
    m = hf_model("swinv2")
    cpb = [n for n, _ in m.named_parameters() if ".continuous_position_bias_mlp." in n]
    scales = [n for n, _ in m.named_parameters() if n.endswith(".logit_scale")]
    assert len(cpb) == 3 and len(scales) == 1
    assert set(cpb + scales) <= set(names(tr.select.tokens, m))
    assert sorted(names(tr.select.weights, m)) == layer_weights(m, skip=("continuous_position_bias_mlp",))
    for key in ("clip", "siglip"):
        assert "logit_scale" in names(tr.select.tokens, hf_model(key)), key


def test_hf_dinov2_register_tokens_are_tokens():
    """Point 4 on the real class."""
    m = hf_model("dinov2-registers")
    assert names(tr.select.tokens, m) == [
        "embeddings.cls_token",
        "embeddings.mask_token",
        "embeddings.position_embeddings",
        "embeddings.register_tokens",
    ]
    assert sorted(names(tr.select.weights, m)) == layer_weights(m)


def test_hf_gated_rms_norms_are_norms():
    """Point 5 on the real classes ``MambaRMSNormGated`` and ``Qwen3NextRMSNormGated``."""
    m = hf_model("mamba2")
    assert type(m.backbone.layers[0].mixer.norm).__name__ == "MambaRMSNormGated"
    assert names(tr.select.norms, m) == [
        "backbone.layers.0.norm.weight",
        "backbone.layers.0.mixer.norm.weight",
        "backbone.norm_f.weight",
    ]
    q = hf_model("qwen3-next")
    assert type(q.model.layers[0].linear_attn.norm).__name__ == "Qwen3NextRMSNormGated"
    assert "model.layers.0.linear_attn.norm.weight" in names(tr.select.norms, q)
    sel = tr.select.all - tr.select.biases - tr.select.norms
    assert "backbone.layers.0.mixer.norm.weight" not in names(sel, m)


def test_hf_presets_on_the_other_configs_pick_layer_weights():
    """On every other config, ``weights`` are the Linear/Conv/Conv1D weights (plus the expert
    and SSM tensors those models keep as bare parameters)."""
    bare = {"qwen3-next": ("experts.down_proj", "experts.gate_up_proj", "mlp.gate.weight"), "mamba": ("mixer.A_log",)}
    for key in ("bert", "gpt2-tied", "llama-untied", "t5", "vit", "whisper", "convnext", "wav2vec2",
                "mamba", "qwen3-next"):
        m = hf_model(key)
        want = set(layer_weights(m, extra=("Conv1D",)))
        want |= {n for n, _ in m.named_parameters() if n.endswith(bare.get(key, ("<none>",)))}
        if key == "wav2vec2":  # the weight-norm parametrized conv: its original0 (g) and original1 (v)
            want |= {n for n, _ in m.named_parameters() if ".parametrizations.weight.original" in n}
        if key == "llama-untied":
            assert "lm_head.weight" in want
        assert set(names(tr.select.weights, m)) == want, key
