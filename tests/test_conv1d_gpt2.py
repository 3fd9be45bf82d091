"""LoRA on transformers' Conv1D (GPT-2: weights stored (d_in, d_out), PEFT's fan_in_fan_out):
"all-linear" adapts c_attn, c_proj and c_fc; the merge adds ΔWᵀ; merge and unload give back
Conv1D; PEFT's files both ways; merging a file into a checkpoint finds the transposed weights."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lightning_lora import (
    AdapterFileError,
    adapted_weights,
    inject_lora,
    load_adapter,
    merge_lora,
    read_adapter,
    save_adapter,
    unload_lora,
)
from lightning_lora.export import merge_into_state_dict
from lightning_lora.layer_types import LoRAConv1D

from .tiny_models import gpt2, randomize, types_and_keys

GPT2_LINEARS = [f"h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_all_linear_adapts_gpt2s_conv1d_projections():
    case = gpt2()
    model = case.model
    assert inject_lora(model, r=4, target_modules="all-linear") == GPT2_LINEARS
    assert all(isinstance(t.layer, LoRAConv1D) for t in adapted_weights(model))
    c_fc = model.h[0].mlp.c_fc
    assert (c_fc.d_out, c_fc.d_in, c_fc.nf) == (128, 32, 128)  # nf reads through to the Conv1D
    assert tuple(c_fc.lora_A["default"].shape) == (4, 32) and tuple(c_fc.lora_B["default"].shape) == (128, 4)


def test_update_equals_a_dense_transposed_delta():
    case = gpt2()
    model = copy.deepcopy(case.model)
    inject_lora(model, r=4, target_modules="all-linear")
    randomize(model)
    reference = copy.deepcopy(case.model)
    with torch.no_grad():
        for t in adapted_weights(model):
            A, B, scale = t.layer.update("default")
            reference.get_submodule(t.name).weight += (scale * B @ A).T  # Conv1D: y = x W + b, W (d_in, d_out)
        torch.testing.assert_close(case.run(model), case.run(reference), rtol=0, atol=1e-5)


def test_merge_equals_unmerged_forward_and_unload_gives_back_conv1d():
    case = gpt2()
    model = case.model
    base = copy.deepcopy(model)
    inject_lora(model, r=4, target_modules="all-linear")
    randomize(model)
    with torch.no_grad():
        unmerged = case.run(model)
        merge_lora(model)
        torch.testing.assert_close(case.run(model), unmerged, rtol=0, atol=1e-5)
        unload_lora(model)
        torch.testing.assert_close(case.run(model), unmerged, rtol=0, atol=1e-5)
    assert type(model.h[0].attn.c_attn).__name__ == "Conv1D"
    assert types_and_keys(model) == types_and_keys(base)


# ------------------------------------------------------------------------------ PEFT interop


def test_peft_loads_our_gpt2_adapter_with_our_outputs(tmp_path):
    case = gpt2()
    ours = copy.deepcopy(case.model)
    inject_lora(ours, r=4, alpha=8, target_modules="all-linear")
    randomize(ours)
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    peft = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path).eval()
    with torch.no_grad():
        expected = case.run(ours)
        torch.testing.assert_close(case.run(peft), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(case.run(peft.merge_and_unload()), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fan_in_fan_out", [True, False])
def test_we_load_peft_gpt2_adapters_with_peft_outputs(fan_in_fan_out, tmp_path):
    """PEFT chooses the same modules for "all-linear", and reads ``fan_in_fan_out`` per layer type
    (it forces it on for Conv1D with a warning): a file saying False loads the same way."""
    case = gpt2()
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        peft = get_peft_model(copy.deepcopy(case.model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize(peft)
    peft.eval().save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "fan_in_fan_out": fan_in_fan_out}))
    ours = copy.deepcopy(case.model)
    assert sorted(load_adapter(ours, tmp_path)) == sorted(GPT2_LINEARS)
    with torch.no_grad():
        expected = case.run(peft)
        torch.testing.assert_close(case.run(ours), expected, rtol=0, atol=1e-5)
        unload_lora(ours, merge=True)
        torch.testing.assert_close(case.run(ours), expected, rtol=0, atol=1e-5)
    assert types_and_keys(ours) == types_and_keys(case.model)


# ------------------------------------------------------------------- merging files into checkpoints


def test_merging_gpt2_files_into_a_checkpoint_adds_the_transposed_delta(tmp_path):
    """Ours record which weights are transposed; PEFT's are told apart by shape, and the square
    ``attn.c_proj`` by the file's ``fan_in_fan_out``."""
    case = gpt2()
    ours = copy.deepcopy(case.model)
    inject_lora(ours, r=4, target_modules="all-linear")
    randomize(ours)
    save_adapter(ours, tmp_path / "ours")
    peft = get_peft_model(copy.deepcopy(case.model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize(peft)
    peft.save_pretrained(tmp_path / "peft")
    for name, model in (("ours", ours), ("peft", peft.merge_and_unload())):
        merged = merge_into_state_dict(case.model.state_dict(), read_adapter(tmp_path / name))
        if name == "ours":
            unload_lora(model, merge=True)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=f"{name}: {key}")


def test_a_peft_file_mixing_both_layouts_is_not_guessed_for_square_weights(tmp_path):
    case = gpt2(lm_head=True)
    targets = ["c_attn", "c_proj", "lm_head"]  # Conv1D (32→96), Conv1D (32→32: square), Linear (32→100)
    peft = get_peft_model(copy.deepcopy(case.model), LoraConfig(r=4, target_modules=targets))
    peft.save_pretrained(tmp_path / "peft", save_embedding_layers=False)  # the tied lm_head's base weight stays out
    # PEFT saves the fan_in_fan_out of the module it adapted last (here lm_head, a Linear: false)
    with pytest.raises(AdapterFileError, match=r"cannot tell from the adapter whether the base stores 'transformer\.h"):
        merge_into_state_dict(case.model.state_dict(), read_adapter(tmp_path / "peft"))
    ours = copy.deepcopy(case.model)
    inject_lora(ours, r=4, target_modules=targets)
    randomize(ours)
    save_adapter(ours, tmp_path / "ours")  # ours record the layout: merged exactly
    merged = merge_into_state_dict(case.model.state_dict(), read_adapter(tmp_path / "ours"))
    unload_lora(ours, merge=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)
