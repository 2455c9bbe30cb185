"""Hugging Face transformers: RegularizerCallback and decay_parameter_names against the real
Trainer, on a tiny LlamaForCausalLM built from a config (random weights, no hub access)
trained a few steps on synthetic tokens."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import torch_regularizers as tr  # noqa: E402
from torch_regularizers import schedules as S  # noqa: E402
from torch_regularizers.integrations.transformers import (  # noqa: E402
    RegularizerCallback,
    decay_parameter_names,
    use_decay_selection,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def tiny_llama(seed=0, tie=False):
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def args(out, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=2,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n}: max |diff| {(a[n] - b[n]).abs().max().item():.3e}"


NORMS = ("input_layernorm", "post_attention_layernorm")


def hand_decay_names(model, embeddings=True):
    """The expected decay set, written out: every Linear weight (and the embedding)."""
    names = []
    if embeddings:
        names.append("model.embed_tokens.weight")
    for i in range(2):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            names.append(f"model.layers.{i}.{proj}.weight")
    names.append("lm_head.weight")
    return names


def test_decay_parameter_names_by_hand():
    m = tiny_llama()
    all_names = [n for n, _ in m.named_parameters()]
    assert sorted(decay_parameter_names(m)) == sorted(hand_decay_names(m))
    no_emb = tr.select.biases | tr.select.norms | tr.select.embeddings
    assert sorted(decay_parameter_names(m, no_decay=no_emb)) == sorted(hand_decay_names(m, embeddings=False))
    excluded = set(all_names) - set(hand_decay_names(m))
    assert excluded == {f"model.layers.{i}.{n}.weight" for i in range(2) for n in NORMS} | {"model.norm.weight"}
    # tied embedding / head: both names of the one tensor leave together
    t = tiny_llama(tie=True)
    names = decay_parameter_names(t, no_decay=no_emb)
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names


def test_native_decay_equals_callback_decoupled_l2(tmp_path):
    """AdamW's own weight_decay on our decay set == weight_decay=0 + the callback's decoupled L2."""
    native = tiny_llama()
    t1 = Trainer(model=native, args=args(tmp_path / "a", weight_decay=0.1), train_dataset=Tokens())
    use_decay_selection(t1, no_decay=~tr.select.weights)
    t1.train()
    groups = t1.optimizer.param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    want = set(hand_decay_names(native, embeddings=False))
    assert {n for n, p in native.named_parameters() if id(p) in decayed} == want

    regd = tiny_llama()
    cb = RegularizerCallback([tr.L2(0.1, mode="decoupled")])
    t2 = Trainer(model=regd, args=args(tmp_path / "b"), train_dataset=Tokens(), callbacks=[cb])
    t2.train()
    assert cb.regularizer.step == 4
    assert_same(params(native), params(regd))
    assert not torch.equal(regd.lm_head.weight, tiny_llama().lm_head.weight)


class Recorder(TrainerCallback):
    """Stands for a report_to integration, registered before our callback."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def rules():
    return [
        tr.L2SP(S.step(0.05, 2, gamma=0.5), mode="decoupled"),
        tr.L1(S.linear_warmup(0.02, 3), mode="prox", on=tr.select.name("*.mlp.*")),
    ]


def test_resume_from_checkpoint_and_logging(tmp_path):
    out = tmp_path / "run"
    straight = tiny_llama()
    rec = Recorder()
    cb = RegularizerCallback(rules())
    t = Trainer(model=straight, args=args(out, save_strategy="steps", save_steps=2), train_dataset=Tokens(),
                callbacks=[rec, cb])
    t.train()
    assert cb.regularizer.step == 4
    final = params(straight)
    # prox L1 gave exact zeros in the MLPs
    assert sum(int((p == 0).sum()) for n, p in straight.named_parameters() if ".mlp." in n) > 0

    # logging: in log_history and seen by a callback registered before ours
    logged = [h for h in t.state.log_history if "reg/l1/sparsity" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert [("reg/l2sp/value" in r) for r in rec.logs if "loss" in r] == [True, True]
    sparsity = sum(int((p == 0).sum()) for n, p in straight.named_parameters() if ".mlp." in n) / sum(
        p.numel() for n, p in straight.named_parameters() if ".mlp." in n
    )
    assert logged[-1]["reg/l1/sparsity"] == pytest.approx(sparsity)

    # resume from checkpoint-2 with a model of other initial weights (L2-SP reference from the checkpoint)
    resumed = tiny_llama(seed=5)
    cb2 = RegularizerCallback(rules())
    t2 = Trainer(model=resumed, args=args(out, save_strategy="steps", save_steps=2), train_dataset=Tokens(),
                 callbacks=[cb2])
    t2.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert cb2.regularizer.step == 4
    assert_same(params(resumed), final)
