"""Lightning: RegularizerCallback against the real package. A 2-epoch Trainer fit on CPU
equals the same loop written by hand with the regularizer attached, bit for bit (grad,
decoupled and prox rules; Lightning steps with optimizer.step(closure)); L1-prox gives exact
zeros; resuming from a Lightning checkpoint continues identically; stats reach the logger."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

import torch_regularizers as tr  # noqa: E402
from torch_regularizers import schedules as S  # noqa: E402
from torch_regularizers.integrations.lightning import RegularizerCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*treespec.*", "ignore:.*does not have many workers.*", "ignore:.*logging interval.*"
)


class Tiny(L.LightningModule):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def rules():
    return [
        tr.L2(S.multistep(0.02, [3, 5], gamma=0.5), on=tr.select.name("net.0.weight")),  # grad
        tr.L2(0.05, mode="decoupled", on=tr.select.name("net.2.weight")),
        tr.L2SP(0.1, mode="decoupled", on=tr.select.name("net.0.weight", "net.2.weight")),
        tr.L1(S.linear_warmup(0.3, 4), mode="prox", on=tr.select.name("net.4.weight")),
    ]


CONFIG = {  # the same rules as a config
    "rules": [
        {"type": "L2", "strength": {"type": "multistep", "value": 0.02, "milestones": [3, 5], "gamma": 0.5},
         "on": {"name": "net.0.weight"}},
        {"type": "L2", "strength": 0.05, "mode": "decoupled", "on": {"name": "net.2.weight"}},
        {"type": "L2SP", "strength": 0.1, "mode": "decoupled", "on": {"name": ["net.0.weight", "net.2.weight"]}},
        {"type": "L1", "strength": {"type": "linear_warmup", "value": 0.3, "warmup_steps": 4}, "mode": "prox",
         "on": {"name": "net.4.weight"}},
    ]
}


def loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def trainer(max_epochs, tmp_path, **kw):
    kw.setdefault("logger", False)
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def by_hand(epochs=2):
    module = Tiny()
    opt = module.configure_optimizers()
    reg = tr.Regularizer(module, rules())
    reg.attach(opt)
    for _ in range(epochs):
        for i, batch in enumerate(loader()):
            opt.zero_grad()
            module.training_step(batch, i).backward()
            opt.step()
    return module, reg


@pytest.fixture(scope="module")
def reference():
    return by_hand()


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def assert_same(a, b):
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), f"param {i}: max |diff| {(p - q).abs().max().item():.3e}"


def test_fit_equals_hand_loop_and_prox_zeros(reference, tmp_path):
    ref_module, ref_reg = reference
    module = Tiny()
    cb = RegularizerCallback(rules())
    trainer(2, tmp_path, callbacks=[cb]).fit(module, loader())
    assert cb.regularizer.step == ref_reg.step == 8
    assert_same(params(module), params(ref_module))
    w = module.net[4].weight
    assert (w == 0).sum() > 0, "L1 prox gave no exact zeros"
    assert not torch.equal(params(module)[0], params(Tiny())[0])
    # the closure was wrapped: without the regularizer the result differs
    plain = Tiny()
    trainer(2, tmp_path).fit(plain, loader())
    assert not torch.equal(plain.net[4].weight, w)


def test_resume_from_checkpoint_continues_identically(reference, tmp_path):
    ref_module, _ = reference
    first = Tiny()
    t1 = trainer(1, tmp_path, callbacks=[RegularizerCallback(rules())])
    t1.fit(first, loader())
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)

    resumed = Tiny(seed=7)  # other initial weights: the L2-SP reference must come from the checkpoint
    cb = RegularizerCallback(CONFIG)
    trainer(2, tmp_path, callbacks=[cb]).fit(resumed, loader(), ckpt_path=ckpt)
    assert cb.regularizer.step == 8
    assert_same(params(resumed), params(ref_module))


def test_stats_reach_the_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = Tiny()
    cb = RegularizerCallback(rules(), log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="run")
    trainer(2, tmp_path, callbacks=[cb], logger=logger, log_every_n_steps=50).fit(module, loader())
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = sorted({int(r["step"]) for r in rows if r.get("reg/l1/sparsity")})
    assert steps == [2, 4, 6, 8]
    last = next(r for r in rows if r["step"] == "8" and r.get("reg/l1/sparsity"))
    w = module.net[4].weight
    assert float(last["reg/l1/sparsity"]) == pytest.approx((w == 0).float().mean().item())
    assert float(last["reg/l2_1/value"]) == pytest.approx(0.5 * 0.05 * (module.net[2].weight ** 2).sum().item(), rel=1e-6)
