"""nn.MultiheadAttention adapters and PEFT, both ways, exactly (real peft).

Our q/k/v adapters of rank r are one adapter of rank 3r over the fused in_proj_weight (A
stacked, B block-diagonal); files are written in PEFT's layout, PEFT's files are read into our
blocks, and PEFT's habit of adding out_proj's update twice (huggingface/peft#3774) is matched."""

import copy
import json
import warnings
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lightning_lora import (
    AdapterFileError,
    LoRAStateError,
    adapted_weights,
    inject_lora,
    load_adapter,
    save_adapter,
    unload_lora,
)
from lightning_lora.peft_mha import CHECKED_PEFT

from .hf_models import MHANet, as_if_trained

X = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))


def out(model):
    with torch.no_grad():
        return model(X)


def peft_load(path):
    """PEFT's loader, failing on any warning (a "missing adapter keys" warning is how PEFT
    ran our old MHA files as the base model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return PeftModel.from_pretrained(MHANet(), path).eval()


CONFIGS = {
    "q-k-v-out": {},
    "q-v": {"mha_projections": ["q", "v"]},
    "no-out_proj": {"exclude_modules": ["attn.out_proj", "cross.out_proj"]},
    "rslora": {"use_rslora": True, "alpha": 5.0},
}


@pytest.mark.parametrize("config", CONFIGS)
def test_peft_runs_our_mha_adapter_exactly(config, tmp_path):
    ours = MHANet().eval()
    inject_lora(ours, r=4, target_modules=["attn", "cross"], **CONFIGS[config])
    as_if_trained(ours)
    save_adapter(ours, tmp_path)
    theirs = peft_load(tmp_path)
    torch.testing.assert_close(out(theirs), out(ours), rtol=0, atol=1e-5)
    assert not torch.allclose(out(theirs), out(MHANet().eval()), atol=1e-4)  # the adapter is there
    torch.testing.assert_close(out(theirs.merge_and_unload()), out(ours), rtol=0, atol=1e-5)


def test_the_file_holds_one_fused_pair_per_mha_in_peft_layout(tmp_path):
    ours = MHANet().eval()
    inject_lora(ours, r=4, target_modules=["attn"], mha_projections=["q", "v"])
    save_adapter(ours, tmp_path)
    keys = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert keys == {
        "base_model.model.attn.lora_A.weight": (8, 32),  # A_q stacked on A_v: rank 4 + 4
        "base_model.model.attn.lora_B.weight": (96, 8),  # block-diagonal, zero rows for k
        "base_model.model.attn.base_layer.out_proj.lora_A.weight": (8, 32),  # rank 4, zero-padded to 8
        "base_model.model.attn.base_layer.out_proj.lora_B.weight": (32, 8),
    }
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["attn"] and config["exclude_modules"] is None
    assert config["rank_pattern"] == {"attn": 8} and config["alpha_pattern"] == {"attn": 32.0}  # scale 16/4 kept


def test_we_run_a_peft_mha_adapter_exactly(tmp_path):
    theirs = get_peft_model(MHANet(), LoraConfig(r=4, lora_alpha=8, target_modules=["attn", "cross"])).eval()
    as_if_trained(theirs)
    theirs.save_pretrained(tmp_path)
    ours = MHANet().eval()
    names = load_adapter(ours, tmp_path)
    assert names == [
        "attn.in_proj_weight[q]",
        "attn.in_proj_weight[k]",
        "attn.in_proj_weight[v]",
        "attn.out_proj",
        "cross.in_proj_weight[q]",
        "cross.in_proj_weight[k]",
        "cross.in_proj_weight[v]",
        "cross.out_proj",
    ]
    torch.testing.assert_close(out(ours), out(theirs), rtol=0, atol=1e-5)
    unload_lora(ours, merge=True)
    torch.testing.assert_close(out(ours), out(theirs), rtol=0, atol=1e-5)


def test_our_mha_files_read_back_into_the_same_blocks_bit_for_bit(tmp_path):
    ours = MHANet().eval()
    inject_lora(ours, r=3, target_modules=["attn"], mha_projections=["k", "v"])
    as_if_trained(ours)
    save_adapter(ours, tmp_path)
    fresh = MHANet().eval()
    load_adapter(fresh, tmp_path)
    assert [(t.name, t.layer.r) for t in adapted_weights(fresh)] == [(t.name, t.layer.r) for t in adapted_weights(ours)]
    for a, b in zip(adapted_weights(fresh), adapted_weights(ours), strict=True):
        assert torch.equal(a.layer.lora_A["default"], b.layer.lora_A["default"])
        assert torch.equal(a.layer.lora_B["default"], b.layer.lora_B["default"])
    assert torch.equal(out(fresh), out(ours))


def test_a_peft_file_read_and_written_again_is_the_same_file(tmp_path):
    theirs = get_peft_model(MHANet(), LoraConfig(r=4, lora_alpha=8, target_modules=["attn"])).eval()
    as_if_trained(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = MHANet().eval()
    load_adapter(ours, tmp_path / "theirs")
    save_adapter(ours, tmp_path / "ours")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("theirs", "ours"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # one shared A: rank 4, not 12


def test_peft_refuses_an_mha_with_separate_qkv_weights_instead_of_running_the_base(tmp_path):
    ours = MHANet(kdim=16).eval()
    inject_lora(ours, r=2, target_modules=["attn"])
    save_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match="Only same embed for query/key/value is supported"):
        PeftModel.from_pretrained(MHANet(kdim=16), tmp_path)
    fresh = MHANet(kdim=16).eval()
    load_adapter(fresh, tmp_path)  # our own files still read it
    assert torch.equal(out(fresh), out(ours))


def test_a_peft_mha_file_from_a_newer_peft_is_refused_with_the_reason(tmp_path):
    theirs = get_peft_model(MHANet(), LoraConfig(r=4, target_modules=["attn"]))
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_version"] = f"{CHECKED_PEFT[0]}.{CHECKED_PEFT[1] + 1}.0"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    ours = MHANet().eval()
    with pytest.raises(AdapterFileError, match=r"adds out_proj's update twice \(huggingface/peft#3774\)"):
        load_adapter(ours, tmp_path)
    assert not list(adapted_weights(ours))


def test_blocks_of_one_mha_with_different_scales_are_refused_when_written(tmp_path):
    ours = MHANet().eval()
    inject_lora(ours, r=4, target_modules=["attn"])
    q = next(t.layer for t in adapted_weights(ours) if t.name == "attn.in_proj_weight[q]")
    q.specs["default"] = replace(q.specs["default"], alpha=7.0)
    with pytest.raises(
        LoRAStateError, match=r"cannot write the adapter of 'attn' in PEFT's nn\.MultiheadAttention layout exactly"
    ):
        save_adapter(ours, tmp_path)


def test_peft_adds_an_mha_out_proj_update_twice():
    """Pins the PEFT behaviour our files match (huggingface/peft#3774). When a PEFT release
    fixes it, this fails: then read its files once-counted and raise CHECKED_PEFT."""
    theirs = get_peft_model(MHANet(), LoraConfig(r=4, target_modules=["attn"])).eval()
    out_proj = theirs.base_model.model.attn.base_layer.out_proj
    with torch.no_grad():
        out_proj.lora_B["default"].weight.normal_(0, 0.1)
        delta = out_proj.get_delta_weight("default")
        reference = MHANet().eval()
        reference.attn.out_proj.weight += 2 * delta
    torch.testing.assert_close(out(theirs), out(reference), rtol=0, atol=1e-5)
    import peft

    assert tuple(int(n) for n in peft.__version__.split(".")[:2]) <= CHECKED_PEFT


def test_writing_changes_nothing_in_the_model(tmp_path):
    ours = MHANet().eval()
    inject_lora(ours, r=4, target_modules=["attn", "cross"])
    as_if_trained(ours)
    before = copy.deepcopy(ours.state_dict())
    save_adapter(ours, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
