"""LoRA-FA (``freeze_a``): A keeps its initial value, only B trains, and backward keeps no
adapted layer's input, on real models, through files (ours and PEFT's) and a real Trainer."""

import json

import lightning as L
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from torch import nn

from lightning_lora import (
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    inject_lora,
    load_adapter,
    lora_parameters,
    parameter_stats,
    save_adapter,
)
from lightning_lora.fused import fast_path
from lightning_lora.io import METADATA_KEY
from lightning_lora.state import adapted_weights

from .hf_models import MHANet, as_if_trained, gpt2, ids, llama, logits, resnet
from .test_callback import MLP, loader, trainer


def a_and_b(model):
    """(A parameters, B parameters) of every adapted weight."""
    parts = [t.layer.adapter_parameters(n) for t in adapted_weights(model) for n in t.layer.adapter_names]
    return [p["A"] for p in parts], [p["B"] for p in parts]


def kept_inputs(model, names, tokens):
    """Which of modules ``names``' inputs autograd keeps for backward in one forward."""
    saved, inputs = set(), {}

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    hooks = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: inputs.update({name: args[0]}))
        for name in names
    ]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=tokens).logits.sum()
    for h in hooks:
        h.remove()
    return sorted(name for name, x in inputs.items() if x.untyped_storage().data_ptr() in saved)


def test_freeze_a_trains_b_only_and_leaves_a_bit_identical_on_a_tied_llama():
    model = llama()
    inject_lora(model, r=4, freeze_a=True)
    A, B = a_and_b(model)
    assert A and not any(a.requires_grad for a in A) and all(b.requires_grad for b in B)
    assert [p for p in model.parameters() if p.requires_grad] == B
    assert parameter_stats(model).trainable == sum(b.numel() for b in B)
    assert set(map(id, lora_parameters(model))) == set(map(id, A + B))  # A is still the adapter's

    A0 = [a.detach().clone() for a in A]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        tokens = ids(seed=step)
        loss = nn.functional.cross_entropy(model(input_ids=tokens).logits.flatten(0, 1), tokens.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(a, a0) and a.grad is None for a, a0 in zip(A, A0, strict=True))
    assert all(b.abs().sum() > 0 for b in B)


LAYER_TYPES = {  # model, LoRA fields, a forward returning something to differentiate
    "embedding (Llama)": (
        lambda: llama(tied=False),
        {"target_modules": ["embed_tokens", "q_proj"]},
        lambda m: m(input_ids=ids()).logits,
    ),
    "Conv1D (GPT-2)": (gpt2, {"target_modules": ["c_attn", "c_fc"]}, lambda m: m(input_ids=ids()).logits),
    "conv (ResNet)": (resnet, {"target_modules": ["convolution"]}, lambda m: m(torch.randn(2, 3, 32, 32)).logits),
    "MultiheadAttention": (MHANet, {"target_modules": ["attn", "cross"]}, lambda m: m(torch.randn(2, 5, 32))),
}


@pytest.mark.parametrize("kind", LAYER_TYPES)
def test_freeze_a_holds_on_every_layer_type(kind):
    build, fields, run = LAYER_TYPES[kind]
    model = build()
    inject_lora(model, r=2, freeze_a=True, **fields)
    as_if_trained(model)
    A, B = a_and_b(model)
    assert A and {id(p) for p in model.parameters() if p.requires_grad} == {id(b) for b in B}
    run(model.train()).pow(2).mean().backward()
    assert all(a.grad is None for a in A) and all(b.grad is not None and b.grad.abs().sum() > 0 for b in B)


@pytest.mark.parametrize("path", ["always", "never"])
def test_with_freeze_a_backward_keeps_no_more_inputs_than_the_frozen_model(path):
    """On the fast path and on the reference path: dA is the only gradient that needs an
    adapted layer's input, so with A frozen backward keeps only the inputs the frozen model
    keeps anyway (here: attention's output, which SDPA saves and o_proj reads)."""
    tokens = ids()
    floor = llama()
    names = [n for n, m in floor.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    floor.requires_grad_(False).get_input_embeddings().weight.requires_grad_(True)  # backward runs through
    kept_by_floor = kept_inputs(floor, names, tokens)
    assert len(kept_by_floor) < len(names)
    for freeze_a, expected in ((False, sorted(names)), (True, kept_by_floor)):
        model = llama()
        inject_lora(model, r=4, freeze_a=freeze_a, exclude_modules=["lm_head"])
        with fast_path(path):
            assert kept_inputs(model, names, tokens) == expected


def test_freeze_a_gradients_on_the_fast_path_equal_the_reference_path():
    tokens = ids()
    grads = {}
    for path in ("always", "never"):
        model = llama()
        inject_lora(model, r=4, freeze_a=True)
        as_if_trained(model)
        with fast_path(path):
            model(input_ids=tokens).logits.pow(2).mean().backward()
        grads[path] = [b.grad for b in a_and_b(model)[1]]
        assert all(a.grad is None for a in a_and_b(model)[0])
    for fast, ref in zip(grads["always"], grads["never"], strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_the_file_keeps_freeze_a_and_peft_loads_it_with_equal_outputs(tmp_path):
    ours = llama()
    inject_lora(ours, r=4, freeze_a=True)
    as_if_trained(ours)
    save_adapter(ours, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["freeze_a"] is True

    again = llama()
    load_adapter(again, tmp_path)  # training resumed from the file keeps A frozen
    A, B = a_and_b(again)
    assert not any(a.requires_grad for a in A) and all(b.requires_grad for b in B)
    torch.testing.assert_close(logits(again, ids()), logits(ours, ids()), rtol=0, atol=0)

    theirs = PeftModel.from_pretrained(llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids()), logits(ours, ids()), rtol=0, atol=1e-5)


def test_the_callback_optimizes_b_only_and_a_never_moves(tmp_path):
    torch.manual_seed(0)
    module = MLP()
    callback = LoRACallback(merge_on_fit_end=False, r=2, target_modules=["net.0", "net.2"], freeze_a=True)
    run = trainer(tmp_path, [callback])
    A0 = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            A0.update({id(a): a.detach().clone() for a in a_and_b(pl_module)[0]})

    run.callbacks.append(Snapshot())
    run.fit(module, loader())
    A, B = a_and_b(module)
    optimized = {id(p) for opt in run.optimizers for g in opt.param_groups for p in g["params"]}
    assert optimized == {id(b) for b in B}
    assert all(torch.equal(a, A0[id(a)]) for a in A)
    assert all(b.abs().sum() > 0 for b in B)


def test_freeze_a_must_be_a_boolean():
    with pytest.raises(LoRAConfigError, match="freeze_a must be true or false"):
        LoRAConfig(freeze_a="yes")
