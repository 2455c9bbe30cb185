"""tr.prune with Torch-Pruning: the coupled groups are Torch-Pruning's own dependency groups
(checked by pruning marked weights with Torch-Pruning itself), the penalty over them, and
``shrink``: outputs unchanged (float64, BatchNorm in eval mode) and the parameter count
down by exactly the removed groups' slices, on an MLP, a Conv-BN-ReLU CNN, a torchvision-style
ResNet with residual adds, a transformer MLP block and attention heads."""

import copy
import math
import sys

import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning")

import torch_regularizers as tr  # noqa: E402

D = torch.float64


# --------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 10), nn.Linear(10, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Conv-BN-ReLU chains, a max-pool, a flatten into a linear layer."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.features(x).flatten(1))))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, + identity or a 1x1
    downsample, ReLU."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, width=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MLPBlock(nn.Module):
    """A pre-norm transformer MLP block: x + down(GELU(up(LN(x))))."""

    def __init__(self, d=12, f=24):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.up, self.act, self.down = nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)

    def forward(self, x):
        return x + self.down(self.act(self.up(self.ln(x))))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 12)
        self.blocks = nn.Sequential(MLPBlock(), MLPBlock())
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


class Attention(nn.Module):
    """Hugging Face style attention: separate q/k/v/o projections, heads by a view with -1
    (so removing whole heads needs no attribute change), scale 1/sqrt(head_dim)."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.head_dim = d // heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        return self.o_proj((a @ v).transpose(1, 2).reshape(b, t, -1))


class AttnModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(6, 16), Attention(), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.attn(self.embed(x)))


class MHAModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        x = self.embed(x)
        return self.head(self.mha(x, x, x, need_weights=False)[0])


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=D))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=D) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=D))
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=D))


def make(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLP().to(D), torch.randn(4, 6, dtype=D), {}
    if kind == "cnn":
        m = CNN().to(D)
        _randomize_bn(m, seed)
        return m, torch.randn(2, 3, 8, 8, dtype=D), {}
    if kind == "resnet":
        m = ResNet().to(D)
        _randomize_bn(m, seed)
        return m, torch.randn(2, 3, 8, 8, dtype=D), {}
    if kind == "transformer":
        return Transformer().to(D), torch.randn(2, 7, 5, dtype=D), {}
    if kind == "attention":
        m = AttnModel().to(D)
        a = m.attn
        return m, torch.randn(2, 5, 6, dtype=D), {"num_heads": {a.q_proj: 4, a.k_proj: 4, a.v_proj: 4}}
    raise KeyError(kind)


KINDS = ["mlp", "cnn", "resnet", "transformer", "attention"]


# --------------------------------------------------------------------------- oracle
def _marked(model):
    """A copy whose parameter elements hold unique ids (exact in float64)."""
    m = copy.deepcopy(model)
    k = 0
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.arange(k, k + p.numel(), dtype=D).reshape(p.shape))
            k += p.numel()
    return m


def removed_by_torch_pruning(model, x, root_name, channels):
    """{param name: ids of the elements} Torch-Pruning removes when it prunes ``channels`` of
    the output of ``root_name`` (its own dependency group)."""
    m = _marked(model)
    before = {n: set(p.detach().flatten().tolist()) for n, p in m.named_parameters()}
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=x, verbose=False)
    root = dict(m.named_modules())[root_name]
    dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, channels).prune()
    after = {n: set(p.detach().flatten().tolist()) for n, p in m.named_parameters()}
    return {n: before[n] - after[n] for n in before if before[n] - after[n]}


def ours(model, s, groups_):
    m = _marked(model)
    params = dict(m.named_parameters())
    out = {}
    for g in groups_:
        for name, dim, idx in s.slices(g):
            ids = params[name].detach().index_select(dim, torch.tensor(idx)).flatten().tolist()
            out.setdefault(name, set()).update(ids)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_groups_are_the_dependency_groups_of_torch_pruning(kind):
    model, x, kw = make(kind)
    G = tr.prune.channel_groups(model, x, **kw)
    dg = tp.DependencyGraph().build_dependency(copy.deepcopy(model), example_inputs=x, verbose=False)
    tp_roots = [dg._module2name[grp[0].dep.target.module] for grp in dg.get_all_groups()]
    labels = [s.label for s in G.sets]
    assert sorted(labels + [lab for lab, _ in G.skipped]) == sorted(tp_roots)
    for s in G.sets:
        picks = sorted({0, s.n_groups // 2, s.n_groups - 1})
        for g in picks:
            channels = list(s.root_channels[g])
            assert removed_by_torch_pruning(model, x, s.label, channels) == ours(model, s, [g]), (
                s.label,
                g,
            )
        # the whole set: every channel at once (as get_all_groups yields it), but one
        everything = [c for g in range(1, s.n_groups) for c in s.root_channels[g]]
        assert removed_by_torch_pruning(model, x, s.label, everything) == ours(
            model, s, range(1, s.n_groups)
        )


def test_skipped_groups_say_why():
    model, x, _ = make("transformer")
    G = tr.prune.channel_groups(model, x)
    reasons = dict(G.skipped)
    assert "outputs of the model" in reasons["head"]
    assert any("LayerNorm" in r for r in reasons.values())  # the residual stream
    assert sorted(s.label for s in G.sets) == ["blocks.0.up", "blocks.1.up"]
    up = G["blocks.0.up"]
    assert {(m.name, m.dim, m.role) for m in up.members} == {
        ("blocks.0.up.weight", 0, "out"),
        ("blocks.0.up.bias", 0, "out"),
        ("blocks.0.down.weight", 1, "in"),
    }


def test_heads_are_groups():
    model, x, kw = make("attention")
    G = tr.prune.channel_groups(model, x, **kw)
    s = G["attn.v_proj"]
    assert s.n_groups == 4 and s.heads == 4
    assert [tuple(c) for c in s.root_channels] == [tuple(range(4 * h, 4 * h + 4)) for h in range(4)]
    names = {m.name for m in s.members}
    assert {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight"} <= names
    assert G.sizes("attn.v_proj") == [3 * 4 * (16 + 1) + 16 * 4] * 4


def test_multihead_attention_is_not_supported_and_says_so():
    torch.manual_seed(0)
    model, x = MHAModel().to(D), torch.randn(2, 5, 6, dtype=D)
    with pytest.raises(NotImplementedError, match="MultiheadAttention heads are not supported"):
        tr.prune.channel_groups(model, x, num_heads={model.mha: 4})
    with pytest.raises(ValueError, match="MultiheadAttention"):
        tr.prune.channel_groups(model, x)  # every group is coupled with it or an output
    with pytest.raises(ValueError, match="MultiheadAttention"):
        tr.prune.channel_groups(model, x, on=tr.select.name("embed.*"))


# --------------------------------------------------------------------------- the penalty
def written(G, model, lam):
    params = dict(model.named_parameters())
    r = 0.0
    for s in G.sets:
        for g in range(s.n_groups):
            v = torch.cat(
                [params[n].index_select(d, torch.tensor(i)).reshape(-1) for n, d, i in s.slices(g)]
            )
            r = r + math.sqrt(v.numel()) * torch.linalg.vector_norm(v)
    return lam * r


@pytest.mark.parametrize("kind", ["resnet", "attention"])
def test_penalty_over_torch_pruning_groups_matches_the_written_penalty(kind):
    model, x, kw = make(kind)
    G = tr.prune.channel_groups(model, x, **kw)
    reg = tr.Regularizer(model, [tr.GroupLasso(0.1, groups=G, mode="loss")])
    v, w = reg.penalty(), written(G, model, 0.1)
    assert float(v.detach()) == pytest.approx(float(w.detach()), rel=1e-13)
    params = [dict(model.named_parameters())[n] for n in G.names]
    for a, b in zip(torch.autograd.grad(v, params), torch.autograd.grad(w, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rho", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["resnet", "cnn", "attention"])
def test_vectorized_paths_match_the_per_group_reference(kind, rho):
    """Conv weights sliced along two dims (rows in their own set, columns in the producer's)
    take the one-pass path, a flatten maps a channel to many columns, a head to many rows;
    the per-group loops of impl='reference' are the ground truth."""
    model, x, kw = make(kind)
    G = tr.prune.channel_groups(model, x, **kw)
    rule = tr.GroupLasso(0.1, groups=G) if rho == 0 else tr.SparseGroupLasso(0.1, rho, groups=G)
    tr.Regularizer(model, [rule])
    params = [dict(model.named_parameters())[n] for n in G.names]
    g1 = [torch.randn_like(p) for p in params]
    g2 = [g.clone() for g in g1]
    rule.grad_(params, g1, 0.1, 0.5)
    rule.grad_(params, g2, 0.1, 0.5, impl="reference")
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    base = [p.detach().clone() for p in params]
    # a prox step that zeroes about half of the groups: t·λ·√size_g = ‖θ_g‖ at the median
    norms = G.group_norms(model)
    ratios = torch.cat([norms[s.label] / (0.1 * torch.tensor(G.sizes(s.label), dtype=D).sqrt()) for s in G.sets])
    t = float(ratios.median())
    for op, eta in (("prox_", t), ("decay_", 0.01)):
        for impl in ("foreach", "reference"):
            with torch.no_grad():
                for p, b in zip(params, base):
                    p.copy_(b)
            getattr(rule, op)(params, 0.1, eta, impl=impl)
            if impl == "foreach":
                fast = [p.detach().clone() for p in params]
        for a, p in zip(fast, params):
            torch.testing.assert_close(a, p.detach(), rtol=1e-12, atol=1e-14)
        if op == "prox_":  # some whole groups became zero, not all
            zero = sum(int((n == 0).sum()) for n in G.group_norms(model).values())
            assert 0 < zero < G.n_groups


def test_without_consumers_groups_are_disjoint_and_prox_is_the_block_soft_threshold():
    model, x, _ = make("resnet")
    G = tr.prune.channel_groups(model, x, consumers=False)
    params = dict(model.named_parameters())
    count = {n: torch.zeros(params[n].shape, dtype=torch.long) for n in G.names}
    for s in G.sets:
        for g in range(s.n_groups):
            for n, d, i in s.slices(g):
                count[n].index_add_(d, torch.tensor(i), torch.ones_like(count[n]).index_select(d, torch.tensor(i)))
    assert all(int(c.max()) == 1 for c in count.values())  # each element in exactly one group
    lam, t = 0.3, 0.5
    want = {n: p.detach().clone() for n, p in params.items()}
    for s in G.sets:
        for g in range(s.n_groups):
            sl = s.slices(g)
            v = torch.cat([params[n].index_select(d, torch.tensor(i)).reshape(-1) for n, d, i in sl])
            f = max(0.0, 1 - t * lam * math.sqrt(v.numel()) / float(v.detach().norm()))
            for n, d, i in sl:
                it = torch.tensor(i)
                want[n].index_copy_(d, it, want[n].index_select(d, it) * f)
    reg = tr.Regularizer(model, [tr.GroupLasso(lam, groups=G, mode="prox")])
    reg.apply_prox(lr=t)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-13, atol=1e-15, msg=n)
    assert reg.stats()["grouplasso/zero_groups"] > 0


# --------------------------------------------------------------------------- shrink
def _zero(model, s, groups_, producers_only=False):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for g in groups_:
            for name, dim, idx in s.slices(g):
                role = next(m.role for m in s.members if m.name == name and m.dim == dim)
                if producers_only and role == "in":
                    continue
                params[name].index_fill_(dim, torch.tensor(idx), 0.0)


def _removed_numel(model, G, removed):
    """Distinct parameter elements in the slices of the removed groups (consumer columns too)."""
    params = dict(model.named_parameters())
    mask = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()}
    for s in G.sets:
        for g in removed.get(s.label, ()):
            for name, dim, idx in s.slices(g):
                mask[name].index_fill_(dim, torch.tensor(idx), True)
    return sum(int(m.sum()) for m in mask.values())


def _nparams(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_shrink_keeps_the_outputs_and_drops_exactly_the_zero_slices(kind):
    model, x, kw = make(kind)
    G = tr.prune.channel_groups(model, x, **kw)
    removed = {}
    for k, s in enumerate(G.sets):
        zero = list(range(k % 2, s.n_groups, 2))[: max(1, s.n_groups // 2)]
        _zero(model, s, zero, producers_only=(k % 2 == 1))  # consumers' columns may stay
        removed[s.label] = zero
    expect = _removed_numel(model, G, removed)
    model.eval()
    torch.manual_seed(123)
    probe = torch.randn((3, *x.shape[1:]), dtype=D)  # new inputs, not the traced ones
    with torch.no_grad():
        y0 = model(probe)
    n0 = _nparams(model)
    report = tr.prune.shrink(model, x, G)
    with torch.no_grad():
        y1 = model(probe)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-10)
    assert n0 - _nparams(model) == expect > 0
    assert report.params_before - report.params_after == expect
    assert report.macs_after < report.macs_before
    assert {lab: n for lab, n, _ in report.groups if n} == {k: len(v) for k, v in removed.items()}
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-10
    if kind == "attention":
        assert model.attn.q_proj.weight.shape[0] == 16 - 4 * len(removed["attn.v_proj"])
    assert "params" in str(report) and report.as_dict()["params_after"] == report.params_after


def test_a_layer_whose_channels_are_all_zero_keeps_one():
    model, x, _ = make("mlp")
    with torch.no_grad():
        model.fc2.weight.zero_()
        model.fc2.bias.zero_()
    model.eval()
    probe = torch.randn(5, 6, dtype=D)
    with torch.no_grad():
        y0 = model(probe)
    report = tr.prune.shrink(model, x)
    assert model.fc2.out_features == 1 and report.removed["fc2"] == 7
    assert ("fc2", 7, 8) in report.groups
    with torch.no_grad():
        torch.testing.assert_close(model(probe), y0, rtol=0, atol=1e-10)


def test_shrink_in_training_mode_and_with_new_inputs():
    model, x, _ = make("resnet")
    G = tr.prune.channel_groups(model, x)
    for s in G.sets:
        _zero(model, s, range(0, s.n_groups, 3))
    modes = [m.training for m in model.modules()]
    stats = {n: b.clone() for n, b in model.named_buffers()}
    tr.prune.shrink(model, x, G)
    assert [m.training for m in model.modules()] == modes  # left as it was
    kept = {n: b for n, b in model.named_buffers()}
    assert all(kept[n].numel() <= stats[n].numel() for n in kept)


def test_a_zero_channel_with_a_nonzero_batchnorm_bias_is_kept():
    """Zero conv rows and BN gain but a nonzero BN bias: the channel outputs a constant
    (after zero padding, not a constant for the consumer's border pixels), so it is kept."""
    model, x, _ = make("cnn")
    f = model.features
    with torch.no_grad():
        f[0].weight[2] = 0
        f[0].bias[2] = 0
        f[1].weight[2] = 0
        f[1].bias[2] = 0.7  # channel 2: constant relu(0.7) = 0.7
        for c in (5, 6):  # channels 5, 6: zero throughout
            f[0].weight[c] = 0
            f[0].bias[c] = 0
            f[1].weight[c] = 0
            f[1].bias[c] = 0
    model.eval()
    probe = torch.randn(3, 3, 8, 8, dtype=D)
    with torch.no_grad():
        y0 = model(probe)
    report = tr.prune.shrink(model, x)
    assert model.features[0].out_channels == 6 and report.removed["features.0"] == 2
    with torch.no_grad():
        torch.testing.assert_close(model(probe), y0, rtol=0, atol=1e-10)


def test_shrink_refuses_zero_channels_that_are_not_inert():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 2)).to(D)
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 0  # sigmoid(0) = 0.5: the zero unit still feeds 0.5 forward
    shapes = [p.shape for p in model.parameters()]
    with pytest.raises(ValueError, match=r"changes the model's outputs.*at fault: 0"):
        tr.prune.shrink(model, torch.randn(3, 4, dtype=D))
    assert [p.shape for p in model.parameters()] == shapes  # untouched


def test_attention_without_heads_cannot_remove_single_channels():
    model, x, _ = make("attention")
    a = model.attn
    with torch.no_grad():
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            lin.weight[5] = 0
            lin.bias[5] = 0
    shapes = [p.shape for p in model.parameters()]
    with pytest.raises(ValueError, match="num_heads"):
        tr.prune.shrink(model, x)
    assert [p.shape for p in model.parameters()] == shapes


def test_channel_groups_leaves_modes_and_batchnorm_statistics_alone():
    model, x, _ = make("resnet")
    model.train()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    tr.prune.channel_groups(model, x)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(stats[n], b) for n, b in model.named_buffers())


def test_on_selects_dependency_groups_by_their_producing_layers():
    model, x, _ = make("resnet")
    G = tr.prune.channel_groups(model, x, on=tr.select.name("layer1.*"))
    # the residual stream of layer1 is also produced by conv1 (not selected): left out
    assert sorted(s.label for s in G.sets) == ["layer1.0.conv1", "layer1.1.conv1"]
    all_ = tr.prune.channel_groups(model, x)
    assert len(all_.sets) == 5 and not any(lab.startswith("layer1.0.conv1") for lab, _ in all_.skipped)
    with pytest.raises(ValueError, match="outputs of the model"):
        tr.prune.channel_groups(model, x, on=tr.select.name("fc.*"))


# --------------------------------------------------------------------------- end to end
def test_train_with_prox_then_shrink_then_train_on():
    model, x, _ = make("resnet", seed=3)
    torch.manual_seed(0)
    data = torch.randn(16, 3, 8, 8, dtype=D)
    target = torch.randint(0, 5, (16,))
    G = tr.prune.channel_groups(model, x)
    reg = tr.Regularizer(model, [tr.GroupLasso(0.02, groups=G, mode="prox")])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reg.attach(opt)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data), target).backward()
        opt.step()
    zero = int(reg.stats()["grouplasso/zero_groups"])
    assert 0 < zero < G.n_groups
    model.eval()
    with torch.no_grad():
        y0 = model(data)
    report = tr.prune.shrink(model, x, G)
    assert report.channels_removed > 0 and report.params_after < report.params_before
    with torch.no_grad():
        torch.testing.assert_close(model(data), y0, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="channel_groups again"):
        reg.stats()  # the old grouping does not fit the smaller model
    G2 = tr.prune.channel_groups(model, x)
    reg2 = tr.Regularizer(model, [tr.GroupLasso(0.02, groups=G2, mode="prox")])
    opt2 = torch.optim.SGD(model.parameters(), lr=0.05)
    reg2.attach(opt2)
    model.train()
    opt2.zero_grad()
    nn.functional.cross_entropy(model(data), target).backward()
    opt2.step()
    assert reg2.stats()["grouplasso/zero_groups"] >= 0


def test_torch_pruning_needs_no_torchvision():
    assert "torchvision" not in sys.modules
