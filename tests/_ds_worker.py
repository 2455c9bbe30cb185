"""One rank of the DeepSpeed ZeRO tests (``tests/test_deepspeed.py`` starts two; CPU, gloo).

``python _ds_worker.py RANK 2 INIT_FILE OUT_DIR`` joins a gloo group, lets DeepSpeed use it
(its CPU accelerator) and runs:

* ``zero1`` / ``zero2``: the MLP of the other distributed tests in fp32, two param groups
  (weights, biases), torch Adam under ZeRO stage 1 / 2, every mode (grad, decoupled, prox,
  constraint, loss via ``reg.penalty()``), 3 steps, each rank on half of the batch. The flat
  partition of the weights group cuts ``0.weight`` between the ranks, so the group norms
  of its rules are all-reduced from fragments. Compared with one process on the full batch.
* ``zero1_bf16``: bf16 weights (DeepSpeed's ``BF16_Optimizer`` with fp32 masters): the rules
  act on the masters and reach the bf16 weights (a strong L1 prox empties ``0.weight``;
  MaxNorm holds).
* ``zero3``: ZeRO stage 3 (the parameters themselves partitioned) with the same rules,
  ``mode="loss"`` excepted (refused at attach: ``reg.penalty()`` cannot reach partitioned
  parameters); ``value()``/``stats()`` gather the weights.
* refusals: a whole-tensor rule in a step mode (after ``zero2``), loss mode under ZeRO-3.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_worker as W

LR = W.LR


def zero_rules(tr) -> list:
    """``_dist_worker.train_rules`` with the Euclidean prox (``metric="adaptive"`` needs the
    optimizer state per parameter, which ZeRO keeps flat)."""
    s = tr.select
    return [
        tr.L2(1e-2, on=s.name("0.weight"), mode="grad"),
        tr.L1(2e-2, on=s.name("0.weight"), mode="prox"),
        tr.GroupLasso(3e-2, dim=0, on=s.name("0.weight"), mode="loss"),
        tr.Orthogonal(1e-2, on=s.name("2.weight"), mode="loss"),
        tr.GroupLasso(5e-2, dim=0, on=s.name("2.weight"), mode="prox"),
        tr.SparseGroupLasso(2e-2, 0.3, on=s.name("2.weight"), mode="grad"),
        tr.ElasticNet(5e-2, 0.5, on=s.name("2.weight"), mode="decoupled"),
        tr.L2SP(0.5, on=s.biases, mode="decoupled"),
        tr.MaxNorm(0.9, dim=1, on=s.name("0.weight")),
        tr.UnitNorm(dim=0, on=s.name("2.bias")),
        tr.GroupLasso(2e-2, on=s.name("0.bias"), mode="decoupled"),
    ]


def zero3_rules(tr) -> list:
    """:func:`zero_rules` for ZeRO-3, where ``mode="loss"`` is refused: the loss-mode group
    lasso in grad mode (the same gradient), no Orthogonal (whole-tensor)."""
    s = tr.select
    rules = [r for r in zero_rules(tr) if r.mode != "loss"]
    return [tr.GroupLasso(3e-2, dim=0, on=s.name("0.weight"), mode="grad"), *rules]


def param_groups(model: nn.Module) -> list[dict]:
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("weight")]},
        {"params": [p for n, p in named if n.endswith("bias")]},
    ]


def _engine(model, stage: int, bf16: bool = False):
    import deepspeed

    opt = torch.optim.Adam(param_groups(model), lr=LR)
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    engine, dopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, dopt


def _train(tr, engine, reg, rank: int, steps: int = 3, dtype=torch.float32) -> None:
    x, y = W.batch()
    xs, ys = x.chunk(2)[rank].to(dtype), y.chunk(2)[rank]
    for _ in range(steps):
        loss = nn.functional.mse_loss(engine(xs).float(), ys) + reg.penalty()
        engine.backward(loss)
        engine.step()


def zero_stage(stage: int):
    def run(tr, rank: int) -> dict:
        model = W.mlp()
        reg = tr.Regularizer(model, zero_rules(tr))  # L2-SP references: the initial weights
        engine, dopt = _engine(model, stage)
        reg.attach(engine)  # the engine, its optimizer or the torch optimizer inside: alike
        frag = getattr(model[0].weight, "_hp_mapping", None)
        out = {
            "optimizer": type(dopt).__name__,
            "frag_0weight": None
            if frag is None
            else (frag.lp_fragment_address.start, frag.lp_fragment_address.numel),
        }
        _train(tr, engine, reg, rank)
        if stage == 2:  # a whole-tensor rule in a step mode: refused at attach
            other = tr.Regularizer(
                model, [tr.Orthogonal(1e-2, on=tr.select.name("2.weight"), mode="grad")]
            )
            try:
                other.attach(engine)
                out["orthogonal_grad"] = None
            except ValueError as e:
                out["orthogonal_grad"] = str(e)
        out.update(
            params={n: p.detach().clone() for n, p in model.named_parameters()},
            value=float(reg.value()),
            stats=reg.stats(),
            step=reg.step,
        )
        return out

    return run


def zero3(tr, rank: int) -> dict:
    """ZeRO-3: the parameters themselves are partitioned (each rank holds a flat slice of
    each; 0.bias's 10 elements are 5 + 5, 2.bias's 6 are 3 + 3)."""
    import deepspeed

    model = W.mlp()
    reg = tr.Regularizer(model, zero3_rules(tr))  # bound before initialize: full shapes
    engine, dopt = _engine(model, 3)
    out = {"optimizer": type(dopt).__name__, "local_numel": model[0].weight.numel()}
    bad = tr.Regularizer(model, [tr.L2(1e-2, on=tr.select.name("2.weight"), mode="loss")])
    try:
        bad.attach(engine)
        out["loss_mode"] = None
    except ValueError as e:
        out["loss_mode"] = str(e)
    reg.attach(engine)
    _train(tr, engine, reg, rank)
    out["value"] = float(reg.value())  # gathers the selected weights for the call
    out["stats"] = reg.stats()
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["step"] = reg.step
    return out


def zero1_bf16(tr, rank: int) -> dict:
    s = tr.select
    model = W.mlp()
    reg = tr.Regularizer(
        model,
        [
            tr.L1(5.0, on=s.name("0.weight"), mode="prox"),  # lr·λ = 0.5: every weight to 0
            tr.MaxNorm(0.5, dim=1, on=s.name("2.weight")),
        ],
    )
    engine, dopt = _engine(model, 1, bf16=True)
    reg.attach(dopt)
    _train(tr, engine, reg, rank, steps=2, dtype=torch.bfloat16)
    return {
        "optimizer": type(dopt).__name__,
        "dtype": str(model[0].weight.dtype),
        "w0": model[0].weight.detach().float().clone(),
        "w2_row_norms": torch.linalg.vector_norm(model[2].weight.detach().float(), dim=1),
        "step": reg.step,
    }


SCENARIOS = {
    "zero1": zero_stage(1),
    "zero2": zero_stage(2),
    "zero3": zero3,
    "zero1_bf16": zero1_bf16,
}


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import logging
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for k, v in {
        "RANK": rank,
        "WORLD_SIZE": world,
        "LOCAL_RANK": rank,
        "LOCAL_WORLD_SIZE": world,
    }.items():
        os.environ[k] = str(v)
    import torch_regularizers as tr

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import importlib

    import deepspeed

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (a minute, once per
    # machine); gloo is what these tests are about: skip it. (`import deepspeed.comm.torch as
    # m` would give torch itself: the package's `torch` attribute shadows the submodule.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    W.run_scenarios(tr, rank, SCENARIOS, out_dir)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
