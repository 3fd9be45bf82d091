"""LoRA beyond one device, through Lightning's strategies: DDP on two CPU processes (gloo), FSDP1's
flat shards and FSDP2's DTensors gathered for saving and merging (by hand and through
ModelParallelStrategy, from real and from meta-device weights), and the unwrapped names adapters
are saved under."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from lightning_lora import LoRALinear, LoRATargetError, inject_lora, load_adapter, lora_parameters
from lightning_lora.distributed import merge_gathered, save_adapter_gathered, unwrap, unwrapped_view
from lightning_lora.io import adapter_tensors

from .distributed_train import REAL_MODELS, Net, TinyClassifier, fit, model_output, real_model

HELPER = Path(__file__).with_name("distributed_train.py")


def run_two_processes(mode: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(HELPER.parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(HELPER), mode, str(out)], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_two_processes("ddp", out)
    return out


def test_ddp_reduces_only_lora_gradients_without_find_unused_parameters(ddp_run):
    seen = json.loads((ddp_run / "probe.json").read_text())
    assert seen["world_size"] == 2 and seen["wrapper"] == "DistributedDataParallel"
    assert seen["find_unused_parameters"] is False
    assert seen["n_frozen"] > 0 and seen["frozen_with_grad"] == []  # base weights: .grad is None
    # DDP's reducer holds exactly the LoRA parameters: nothing else is all-reduced
    assert seen["n_registered"] == seen["n_registered_lora"] == seen["n_lora"] == 6
    assert seen["lora_grads_identical_across_ranks"] and seen["lora_grad_norm"] > 0


def test_ddp_adapter_equals_one_process_on_the_same_global_batch(ddp_run, tmp_path):
    fit(devices=1, out=tmp_path)
    two, one = (
        load_file(ddp_run / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
    )
    assert two.keys() == one.keys() and len(two) == 6
    initial_b_is_zero = all(torch.count_nonzero(t) > 0 for k, t in one.items() if "lora_B" in k)
    assert initial_b_is_zero  # it trained: B moved away from its zero init
    # Not bit-exact: each rank averages its 8 examples and DDP averages the two means, while one
    # process averages 16; float addition in another order rounds differently (~1e-8 here).
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run_two_processes("fsdp", out)
    return out, json.loads((out / "fsdp.json").read_text())


@pytest.mark.parametrize("policy", ["blocks", "split", "fully_shard"])
def test_fsdp_adapter_is_gathered_under_bare_names_and_reproduces_the_outputs(fsdp_run, policy):
    out, reports = fsdp_run
    report = reports[policy]
    if policy == "fully_shard":  # FSDP2: every parameter a DTensor, each rank holding rows of it
        assert report["dtensors"] and report["shard_dims"] == [2]
    else:
        assert report["shard_dims"] == [1]  # FSDP1: between steps each rank holds flat 1-D shards only
    saved = load_file(out / f"adapter_{policy}" / "adapter_model.safetensors")
    assert sorted(saved) == report["names_before"]  # no "_fsdp_wrapped_module" in any key
    fresh = Net()  # same base weights (seed 0), adapter from the file
    load_adapter(fresh, out / f"adapter_{policy}")
    with torch.no_grad():
        y = fresh(torch.tensor(report["x"]))
    torch.testing.assert_close(y, torch.tensor(report["before"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(report["sharded"]), torch.tensor(report["before"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy", ["blocks", "split", "fully_shard"])
def test_fsdp_merge_writes_delta_w_into_the_shards_and_keeps_the_layers(fsdp_run, policy):
    report = fsdp_run[1][policy]
    assert report["unloaded"] is False
    torch.testing.assert_close(torch.tensor(report["merged"]), torch.tensor(report["before"]), rtol=0, atol=1e-5)


def test_lora_wrap_policy_keeps_frozen_weights_out_of_the_adapters_flat_parameters(fsdp_run):
    reports = fsdp_run[1]
    assert reports["blocks"]["units_mixing_frozen_weights_and_adapters"] > 0  # the problem it solves
    assert reports["split"]["units_mixing_frozen_weights_and_adapters"] == 0


def test_fully_shard_keeps_frozen_weights_gradient_free_and_refuses_a_late_adapter(fsdp_run):
    report = fsdp_run[1]["fully_shard"]
    assert report["frozen_with_grad"] == [] and report["units_mixing_frozen_weights_and_adapters"] == 0
    assert report["late_injection"].startswith("LoRAStateError: the model is already sharded")
    assert "inject_lora before fully_shard" in report["late_injection"]


@pytest.fixture(scope="module")
def fsdp2_models_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_models")
    run_two_processes("fsdp2_models", out)
    return out, json.loads((out / "fsdp2_models.json").read_text())


@pytest.mark.parametrize("name", REAL_MODELS)
def test_fully_shard_on_real_models_saves_what_ours_and_peft_load_alike(fsdp2_models_run, name):
    """Llama with tied embeddings, GPT-2 (Conv1D) and a ResNet (convolutions), built from their
    configs, adapters set to trained-like values, then sharded by hand: the adapter gathered from
    the shards reproduces the model on one process through our loader and through PEFT's, and the
    merge into the shards leaves the outputs and the embedding tie as they were."""
    from peft import PeftModel

    out, reports = fsdp2_models_run
    report = reports[name]
    before = torch.tensor(report["before"])
    assert report["all_dtensors"] and report["frozen_with_grad"] == []
    assert report["lora_without_grad"] == report["lora_without_grad_after_save"] == []  # a save keeps .grad
    torch.testing.assert_close(torch.tensor(report["sharded"]), before, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(report["merged"]), before, rtol=0, atol=1e-5)
    if name == "llama_tied":
        assert report["tied_after_merge"]  # lm_head is the embedding still: all-linear leaves it out
    ours, _, _, x = real_model(name)
    load_adapter(ours, out / name)
    theirs = PeftModel.from_pretrained(real_model(name)[0], out / name)
    torch.testing.assert_close(model_output(ours.eval(), x), before, rtol=0, atol=1e-6)
    torch.testing.assert_close(model_output(theirs.eval(), x), before, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ FSDP2 through ModelParallelStrategy


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    runs = {}
    for mode in ("fsdp2", "fsdp2_meta"):
        out = tmp_path_factory.mktemp(mode)
        run_two_processes(mode, out)
        runs[mode] = out, json.loads((out / "fsdp2.json").read_text())
    return runs


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp2_meta"])
def test_model_parallel_strategy_trains_only_the_sharded_adapters(fsdp2_runs, mode):
    seen = fsdp2_runs[mode][1]
    assert seen["world_size"] == 2 and seen["all_dtensors"]  # the adapters were sharded with the rest
    assert seen["n_frozen"] > 0 and seen["frozen_with_grad"] == []
    assert seen["lora_with_grad"] == seen["n_lora"] == 6
    assert seen["optimizer_holds_lora_only"]


def test_model_parallel_adapter_equals_one_process_on_the_same_global_batch(fsdp2_runs, tmp_path):
    fit(devices=1, out=tmp_path)
    two = load_file(fsdp2_runs["fsdp2"][0] / "adapter" / "adapter_model.safetensors")
    one = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert two.keys() == one.keys() and len(two) == 6  # gathered whole, under the bare names
    for key in one:  # as DDP: the gradient is averaged in another order (rounding, ~1e-8)
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6)


def test_model_parallel_merge_at_fit_end_equals_the_base_plus_the_saved_adapter(fsdp2_runs):
    """The sharded model, merged at fit end, computes what the saved adapter on one process does."""
    out, seen = fsdp2_runs["fsdp2"]
    fresh = TinyClassifier()  # seed 0: the base weights the run started from
    load_adapter(fresh, out / "adapter")
    with torch.no_grad():
        expected = fresh.net(torch.tensor(seen["x"]))
    torch.testing.assert_close(torch.tensor(seen["merged"]), expected, rtol=0, atol=1e-5)


def test_meta_device_adapters_are_initialised_when_lightning_materialises_the_model(fsdp2_runs):
    """Lightning calls reset_parameters only on modules holding parameters directly; the
    adapters' dicts do, and re-draw their layer: B zero, A Kaiming-uniform, nothing left on meta."""
    out, seen = fsdp2_runs["fsdp2_meta"]
    assert seen["initial_B_zero"] and seen["initial_A_in_kaiming_bound"] and not seen["meta_left"]
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 6 and all(torch.isfinite(t).all() for t in saved.values())
    assert all(torch.count_nonzero(t) > 0 for k, t in saved.items() if "lora_B" in k)  # it trained


def test_model_parallel_checkpoints_resume_the_adapter_exactly(tmp_path):
    """torch.distributed.checkpoint restores only complete model state dicts, so under
    ModelParallelStrategy the callback keeps the base in checkpoints (adapter-only ones could be
    written but never resumed); resumed, the adapter is the one the checkpoint held, bit for bit."""
    run_two_processes("fsdp2_resume", tmp_path)
    trained = load_file(tmp_path / "trained" / "adapter_model.safetensors")
    restored = load_file(tmp_path / "restored" / "adapter_model.safetensors")
    assert trained.keys() == restored.keys() and len(trained) == 6
    assert all(torch.count_nonzero(t) > 0 for k, t in trained.items() if "lora_B" in k)
    for key in trained:
        assert torch.equal(restored[key], trained[key])


def test_model_parallel_refuses_layers_built_in_configure_model_and_says_where_to_build_them(tmp_path):
    run_two_processes("fsdp2_late", tmp_path)
    seen = json.loads((tmp_path / "fsdp2.json").read_text())
    assert seen["refusal"].startswith("LoRATargetError") and not seen["saved"]
    assert "build the layers in __init__" in seen["refusal"]


# ------------------------------------------------------------------ DeepSpeed (where it is installed)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="deepspeed is not a dependency: pip install deepspeed to run these")
    out = tmp_path_factory.mktemp("zero3")
    run_two_processes("zero3", out)
    return out, json.loads((out / "deepspeed.json").read_text())


def test_zero3_partitions_everything_and_its_optimizer_holds_the_adapters_only(zero3_run):
    seen = zero3_run[1]
    assert seen["engine"] == "DeepSpeedEngine" and seen["partitioned"]
    assert not seen["optimizer_holds_frozen"]


def test_zero3_adapter_is_gathered_whole_and_equals_one_process(zero3_run, tmp_path):
    """PEFT #453: under ZeRO-3 a plain state_dict holds empty partitions. Gathered, the adapter is
    whole and equals a one-process run on the same global batch."""
    fit(devices=1, out=tmp_path)
    two = load_file(zero3_run[0] / "adapter" / "adapter_model.safetensors")
    one = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert two.keys() == one.keys() and len(two) == 6
    for key in one:
        assert two[key].shape == one[key].shape
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6)


def test_zero3_merge_at_fit_end_equals_the_base_plus_the_saved_adapter(zero3_run):
    out, seen = zero3_run
    fresh = TinyClassifier()
    load_adapter(fresh, out / "adapter")
    with torch.no_grad():
        expected = fresh(torch.tensor(seen["x"]))
    torch.testing.assert_close(torch.tensor(seen["merged"]), expected, rtol=0, atol=1e-5)


def test_unwrapped_view_names_modules_as_the_bare_model():
    net = Net()
    inject_lora(net, r=2, target_modules="all-linear", init="gaussian")
    expected = {k: v.clone() for k, v in adapter_tensors(net).items()}
    for i, block in enumerate(net.blocks):  # activation checkpointing wraps each block
        net.blocks[i] = checkpoint_wrapper(block)
    compiled = torch.compile(net)  # OptimizedModule: a wrapper too (not compiled until called)
    assert any("_checkpoint_wrapped_module" in n for n, _ in net.named_modules())
    view = unwrapped_view(compiled)
    assert unwrap(compiled) is net and view is not net
    got = adapter_tensors(view)
    assert got.keys() == expected.keys()  # bare names: no "_checkpoint_wrapped_module", no "_orig_mod"
    for key in got:
        torch.testing.assert_close(got[key], expected[key])
    # the view shares the parameters (no copies): what FSDP gathers in place is what is read
    assert {t.data_ptr() for t in got.values()} == {p.data_ptr() for p in lora_parameters(net)}


def test_unsharded_save_and_merge_are_save_adapter_and_unload(tmp_path):
    net = Net()
    inject_lora(net, r=2, target_modules="all-linear", init="gaussian")
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = net(x)
    save_adapter_gathered(net, net, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert merge_gathered(net, net) is True
    assert not any(isinstance(m, LoRALinear) for m in net.modules()) and not lora_parameters(net)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=0, atol=1e-5)
    assert isinstance(net.head, nn.Linear)


def test_non_zero_ranks_write_nothing(tmp_path):
    net = Net()
    inject_lora(net, r=2, target_modules="all-linear")
    assert save_adapter_gathered(net, net, tmp_path / "b", is_global_zero=False) is None
    assert not (tmp_path / "b").exists()


def test_meta_device_adapters_are_drawn_when_materialised_as_lightning_does():
    from lightning.fabric.utilities.init import _materialize_distributed_module

    with torch.device("meta"):
        net = Net()
    inject_lora(net, r=2, target_modules="all-linear")
    assert all(p.is_meta for p in lora_parameters(net))
    _materialize_distributed_module(net, torch.device("cpu"))  # to_empty, then reset_parameters
    for layer in (m for m in net.modules() if isinstance(m, LoRALinear)):
        assert torch.count_nonzero(layer.lora_B["default"]) == 0
        A = layer.lora_A["default"]
        assert A.abs().max() <= layer.d_in**-0.5 and A.std() > 0  # Kaiming-uniform, not leftover memory


@pytest.mark.parametrize("fields", [{"use_dora": True}, {"init": "pissa"}])
def test_adapters_computed_from_w_are_refused_on_the_meta_device(fields):
    with torch.device("meta"):
        net = Net()
    with pytest.raises(LoRATargetError, match="meta device"):
        inject_lora(net, r=2, target_modules="all-linear", **fields)
    assert not lora_parameters(net) and not any(isinstance(m, LoRALinear) for m in net.modules())
