"""DoRA (weight-decomposed LoRA, ``use_dora``): PEFT's ``DoraLinearLayer`` exactly (outputs,
gradients of A, B and m, files both ways), merges that unmerge back to W, and refusals by name
where it does not run; then a real Trainer fit with ``LoRACallback(use_dora=True)``."""

import copy
import gc
import json
import warnings
import weakref

import lightning as L
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_lora import (
    AdapterFileError,
    LoRACallback,
    LoRAConfig,
    LoRAStateError,
    LoRATargetError,
    combine_adapters,
    inject_lora,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    parameter_stats,
    read_adapter,
    save_adapter,
    set_adapter,
    unload_lora,
    unmerge_lora,
)
from lightning_lora.cli import inspect_adapter
from lightning_lora.export import merge_into_state_dict
from lightning_lora.layers import LoRALinear
from lightning_lora.state import adapted_weights

from .hf_models import bert, gpt2, ids, llama
from .test_hydra_config import composed

MODELS = {
    "bert": (bert, ["query", "value", "intermediate.dense", "output.dense"]),  # Linears with a bias
    "llama": (lambda: llama(tied=False), ["q_proj", "v_proj", "down_proj"]),  # without
    "gpt2": (gpt2, ["c_attn", "c_proj"]),  # transformers' Conv1D: W stored (d_in, d_out)
}


def as_if_trained(model: nn.Module, seed: int = 1) -> None:
    """Non-zero A and B, and m moved off its initial norms (with B = 0 and m = ‖W‖ DoRA is the
    identity and every comparison would pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapted_weights(model):
            for part, p in t.layer.adapter_parameters("default").items():
                if part == "m":
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_twin(base: nn.Module, ours: nn.Module, targets: list[str], dropout: float = 0.0) -> nn.Module:
    """PEFT's DoRA model of ``base`` holding our A, B and m."""
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, lora_dropout=dropout)
    )
    with torch.no_grad():
        for t in adapted_weights(ours):
            layer = theirs.base_model.model.get_submodule(t.name)
            layer.lora_A["default"].weight.copy_(t.layer.lora_A["default"])
            layer.lora_B["default"].weight.copy_(t.layer.lora_B["default"])
            layer.lora_magnitude_vector["default"].weight.copy_(t.layer.lora_magnitude_vector["default"])
    return theirs


def pair(kind: str, dropout: float = 0.0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(base, ours, PEFT's)``: one tiny model, our DoRA adapter on it, PEFT's with the same tensors."""
    make, targets = MODELS[kind]
    base = make()
    ours = copy.deepcopy(base)
    inject_lora(ours, r=4, alpha=8, target_modules=targets, use_dora=True, dropout=dropout)
    as_if_trained(ours)
    return base, ours, peft_twin(base, ours, targets, dropout)


def output(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=tokens)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal within float32 rounding: 1e-5 relative to the largest output."""
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.detach().abs().max()))


# ------------------------------------------------------------------------------- the math


def test_the_magnitude_starts_at_the_row_norms_so_the_model_is_unchanged_at_step_0():
    base = bert()
    model = copy.deepcopy(base)
    inject_lora(model, r=4, target_modules=["query", "value"], use_dora=True)
    for t in adapted_weights(model):
        torch.testing.assert_close(t.layer.lora_magnitude_vector["default"], t.weight.norm(dim=1), rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(output(model, ids()), output(base, ids()))


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_forward_equals_peft_with_the_same_a_b_and_m(kind, mode):
    base, ours, theirs = pair(kind)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    torch.manual_seed(0)  # the models' own dropout in train mode draws the same masks in both
    mine = output(ours, ids())
    torch.manual_seed(0)
    close(mine, output(theirs, ids()))
    assert (mine - output(base.train(mode == "train"), ids())).abs().max() > 1e-2  # the adapter matters


def test_with_dropout_the_base_term_is_recomputed_on_the_dropped_input_as_peft_does():
    _, ours, theirs = pair("llama", dropout=0.3)
    ours.train()
    theirs.train()
    torch.manual_seed(0)
    mine = output(ours, ids())
    torch.manual_seed(0)
    close(mine, output(theirs, ids()))
    torch.manual_seed(1)
    assert (output(ours, ids()) - mine).abs().max() > 1e-3  # dropout did act


@pytest.mark.parametrize("kind", list(MODELS))
def test_gradients_of_a_b_and_m_equal_peft(kind):
    _, ours, theirs = pair(kind)
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(0)
        out = output(model, ids())
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        (out * probe).sum().backward()  # not a function of a LayerNorm's output alone, which is flat
    for t in adapted_weights(ours):
        peft_layer = theirs.base_model.model.get_submodule(t.name)
        theirs_by_part = {
            "A": peft_layer.lora_A["default"].weight,
            "B": peft_layer.lora_B["default"].weight,
            "m": peft_layer.lora_magnitude_vector["default"].weight,
        }
        for part, p in t.layer.adapter_parameters("default").items():
            expected = theirs_by_part[part].grad
            assert p.grad is not None and p.grad.abs().max() > 0, (t.name, part)
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_the_norm_is_a_constant_and_no_weight_sized_tensor_is_kept_for_backward():
    """Autograd keeps x, x Aᵀ, ``h = x (W + s·BA)ᵀ`` and the (d_out,) vectors; the weight itself
    only by reference (the base layer's own), never a copy or ‖W + s·BA‖'s operand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    inject_lora(model, r=4, target_modules=["0"], use_dora=True)
    as_if_trained(model)
    layer, x = model[0], torch.randn(5, 64, requires_grad=True)
    kept = []

    class Box:
        def __init__(self, t):
            self.t = t

    def pack(t):
        box = Box(t)
        kept.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        y = model(x)
    gc.collect()
    alive = [r().t for r in kept if r() is not None]
    big = [t for t in alive if t.numel() >= 48 * 64]
    assert all(t.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr() for t in big)
    assert sum(t.numel() for t in alive if t.shape == (5, 48)) == 5 * 48  # one (N, d_out) tensor: h
    assert layer.weight_norm("default").requires_grad is False
    y.sum().backward()
    assert layer.lora_magnitude_vector["default"].grad is not None and layer.weight.grad is None


# ------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w(kind):
    _, ours, theirs = pair(kind)
    with torch.no_grad():
        before = output(ours, ids())
        weights = {t.name: t.weight.detach().clone() for t in adapted_weights(ours)}
        merge_lora(ours)
        close(output(ours, ids()), before)
        merged_theirs = theirs.merge_and_unload()
        for t in adapted_weights(ours):  # the merged weight is PEFT's merged weight
            torch.testing.assert_close(t.weight, merged_theirs.get_submodule(t.name).weight, rtol=0, atol=1e-6)
        unmerge_lora(ours)
        for t in adapted_weights(ours):
            torch.testing.assert_close(t.weight, weights[t.name], rtol=0, atol=1e-6)
        close(output(ours, ids()), before)


def test_unload_with_merge_gives_the_plain_model_peft_merge_and_unload_gives():
    base, ours, theirs = pair("llama")
    with torch.no_grad():
        expected = output(ours, ids())
        unload_lora(ours, merge=True)
        assert not any(isinstance(m, LoRALinear) for m in ours.modules())
        assert list(ours.state_dict()) == list(base.state_dict())
        close(output(ours, ids()), expected)
        close(output(ours, ids()), output(theirs.merge_and_unload(), ids()))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_merge_of_files_without_a_model_equals_the_models_merge(kind, tmp_path):
    base, ours, _ = pair(kind)
    save_adapter(ours, tmp_path)
    merged = merge_into_state_dict(base.state_dict(), read_adapter(tmp_path))
    unload_lora(ours, merge=True)
    for key, tensor in ours.state_dict().items():
        torch.testing.assert_close(merged[key], tensor, rtol=0, atol=0)


def test_a_dora_adapter_runs_and_merges_alone():
    model = bert()
    inject_lora(model, r=4, target_modules=["query"], use_dora=True)
    inject_lora(model, r=4, target_modules=["query"], adapter_name="plain")
    with pytest.raises(LoRAStateError, match=r"DoRA adapter 'default' cannot be active together with \['plain'\]"):
        set_adapter(model, ["default", "plain"])
    with pytest.raises(LoRAStateError, match=r"cannot merge DoRA adapter 'default' into .* together with"):
        merge_lora(model, ["default", "plain"])
    with pytest.raises(LoRAStateError, match=r"cannot combine adapter 'default': it is a DoRA adapter"):
        combine_adapters(model, {"default": 1.0, "plain": 1.0}, "both")
    as_if_trained(model)
    set_adapter(model, "default")
    weights = {t.name: t.weight.detach().clone() for t in adapted_weights(model)}
    merge_lora(model, "plain")  # one after the other, undone in reverse order
    merge_lora(model, "default")
    unmerge_lora(model)
    for t in adapted_weights(model):
        torch.testing.assert_close(t.weight, weights[t.name], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- what an adapter holds


def test_the_magnitude_is_trained_counted_checkpointed_and_copied():
    model = bert()
    names = inject_lora(model, r=4, target_modules=["query"], use_dora=True)
    magnitudes = [t.layer.lora_magnitude_vector["default"] for t in adapted_weights(model)]
    assert all(any(m is p for p in lora_parameters(model)) for m in magnitudes)
    assert all(m.requires_grad for m in magnitudes)
    assert [k for k in lora_state_dict(model) if "magnitude" in k] == [
        f"{n}.lora_magnitude_vector.default" for n in names
    ]
    stats = parameter_stats(model)
    assert stats.trainable == sum(4 * (32 + 32) + 32 for _ in names)
    assert stats.modules[0].params == 4 * (32 + 32) + 32
    saved = [m.detach().clone() for m in magnitudes]
    with torch.no_grad():
        before = output(model, ids())
        twin = copy.deepcopy(model)  # a copy trains and merges on its own
        as_if_trained(twin)
        merge_lora(twin)
        assert all(torch.equal(m, s) for m, s in zip(magnitudes, saved, strict=True))
        assert torch.equal(output(model, ids()), before)


# ------------------------------------------------------------------------------- files


def test_our_file_is_peft_dora_and_peft_loads_it_with_the_same_outputs(tmp_path):
    base, ours, _ = pair("llama")
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    with torch.no_grad():
        close(output(theirs, ids()), output(ours, ids()))
    again = theirs.load_adapter(tmp_path, adapter_name="again")
    assert again.missing_keys == [] and again.unexpected_keys == []


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_peft_dora_file_loads_into_ours_with_the_same_outputs(kind, tmp_path):
    base, _, theirs = pair(kind)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    assert all(t.layer.specs["default"].use_dora for t in adapted_weights(model))
    with torch.no_grad():
        close(output(model, ids()), output(theirs.eval(), ids()))
    save_adapter(model, tmp_path / "again")  # and written again, tensor for tensor
    first, second = (
        load_file(tmp_path / "adapter_model.safetensors"),
        load_file(tmp_path / "again" / "adapter_model.safetensors"),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_inspect_shows_use_dora_and_counts_the_magnitudes(tmp_path):
    _, ours, _ = pair("bert")
    save_adapter(ours, tmp_path)
    report = inspect_adapter(tmp_path)
    assert "use_dora=True" in report
    expected = sum(p.numel() for p in lora_parameters(ours))
    assert f"parameters  {expected:,} in A/B and DoRA magnitudes" in report


def test_files_whose_magnitudes_and_use_dora_disagree_are_refused(tmp_path):
    _, ours, _ = pair("bert")
    save_adapter(ours, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    save_file({k: v for k, v in tensors.items() if k != first}, weights, metadata={})
    with pytest.raises(AdapterFileError, match=r"sets use_dora: true but has no lora_magnitude_vector for"):
        read_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    save_file(tensors, weights, metadata={})
    with pytest.raises(AdapterFileError, match=r"holds DoRA magnitudes .* but its adapter_config\.json does not set"):
        read_adapter(tmp_path)


def test_a_config_switched_to_dora_after_a_plain_save_is_refused(tmp_path):
    model = bert()
    inject_lora(model, r=4, target_modules=["query"])
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterFileError, match=r"says use_dora=True but .* was saved with use_dora=False"):
        read_adapter(tmp_path)


# ------------------------------------------------------------------------------- where it does not run


class Parts(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.embed = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
        self.scaled = Scaled(8, 8)
        self.head = nn.Linear(8, 2)


class Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("conv", r"DoRA is implemented for nn\.Linear and transformers' Conv1D only, not for convs"),
        ("embed", r"DoRA is implemented for nn\.Linear and transformers' Conv1D only, not for embeddings"),
        ("attn", r"through a parametrization, where DoRA is not implemented \(PEFT refuses DoRA"),
        ("linear1", r"its parent TransformerEncoderLayer reads its weight directly"),
        ("scaled", r"Scaled has a forward of its own, so base\(x\) − b need not be x Wᵀ"),
    ],
)
def test_dora_is_refused_by_name_where_it_does_not_run_and_nothing_changes(target, reason):
    model = Parts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRATargetError, match=rf"use_dora=True, but .* selects '[\w.]*{target}' \(\w+\): .*{reason}"):
        inject_lora(model, r=2, target_modules=[target], use_dora=True)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    inject_lora(model, r=2, target_modules=["head"], use_dora=True)  # a plain nn.Linear is fine


def test_a_quantized_base_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False))
    with pytest.raises(LoRATargetError, match=r"its weight is quantized \(Linear8bitLt\)"):
        inject_lora(model, r=2, target_modules=["0"], use_dora=True)


# ------------------------------------------------------------------------------- Lightning and Hydra


class CausalLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.language_model = llama(tied=False)

    def training_step(self, batch, batch_idx):
        return self.language_model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=5e-2)


def test_a_fit_with_the_callback_trains_m_saves_a_file_peft_loads_and_merges_at_the_end(tmp_path):
    module = CausalLM()
    fresh = llama(tied=False)  # the same random weights, built again (seeded)
    callback = LoRACallback(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, adapter_dir=str(tmp_path / "a"))
    tokens = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(tokens, batch_size=4)
    trainer = L.Trainer(
        max_steps=3, callbacks=[callback], default_root_dir=tmp_path, accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, loader)
    assert not any(isinstance(m, LoRALinear) for m in module.modules())  # merged and unloaded at fit end
    file = read_adapter(tmp_path / "a")
    assert file.config["use_dora"] is True and len(file.magnitudes) == 4
    for name, m in file.magnitudes.items():  # trained: no longer the norms it started at
        assert not torch.allclose(m, fresh.get_submodule(name).weight.norm(dim=1))
    module.eval()
    with torch.no_grad():
        served = PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
        close(served(input_ids=tokens).logits, module.language_model(input_ids=tokens).logits)


def test_an_adapter_only_checkpoint_holds_the_magnitude_and_resuming_restores_it(tmp_path):
    def fit(module: CausalLM, directory: str, **kwargs) -> L.Trainer:
        callback = LoRACallback(r=4, target_modules=["q_proj"], use_dora=True, merge_on_fit_end=False,
                                adapter_dir=str(tmp_path / directory))  # fmt: skip
        trainer = L.Trainer(
            max_steps=2, callbacks=[callback], default_root_dir=tmp_path, accelerator="cpu", logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )  # fmt: skip
        tokens = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
        trainer.fit(module, torch.utils.data.DataLoader(tokens, batch_size=4), **kwargs)
        return trainer

    fit(CausalLM(), "a").save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    magnitudes = sorted(k for k in saved if ".lora_magnitude_vector." in k)
    assert len(magnitudes) == 2 and not any(k.endswith("q_proj.base_layer.weight") for k in saved)  # adapter only
    resumed = CausalLM()
    initial = resumed.state_dict()
    for key in magnitudes:  # trained away from ‖W‖, where a fresh injection starts
        weight = initial[key.replace(".lora_magnitude_vector.default", ".weight")]
        assert not torch.allclose(saved[key], weight.norm(dim=1))
    fit(resumed, "b", ckpt_path=tmp_path / "last.ckpt")
    state = resumed.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in magnitudes)


def test_lora_use_dora_true_composes_and_reaches_the_callback():
    from hydra.utils import instantiate

    callback = instantiate(composed("lora.use_dora=true").lora)
    assert callback.config.use_dora is True
    assert LoRAConfig.build(use_dora=False).spec.use_dora is False
