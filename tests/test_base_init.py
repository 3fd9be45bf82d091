"""PiSSA and OLoRA, PEFT's base-changing initialisations: the same A, B and residual W as PEFT,
the model unchanged at step 0, a saved file that is PEFT's plain-LoRA conversion for the original
base, and every operation that would silently leave the residual weight refused."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lightning_lora import (
    AdapterFileError,
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    LoRAStateError,
    LoRATargetError,
    combine_adapters,
    delete_adapter,
    inject_lora,
    load_adapter,
    resize_adapter,
    save_adapter,
    unload_lora,
)
from lightning_lora.base_init import changes_base

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model):
    return model(input_ids=IDS).logits


def trained(model):
    """A and B moved away from their init, as training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_b_and_the_residual_weight_equal_peft_and_the_model_is_unchanged_at_step_0(init):
    base = llama()
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, init=init, target_modules=TARGETS))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS)
    )
    their = dict(theirs.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        if ".lora_" in name or "base_layer.weight" in name:
            key = "base_model.model." + name + (".weight" if ".lora_" in name else "")
            torch.testing.assert_close(p, their[key], rtol=0, atol=1e-6)
            compared += 1
    assert compared == 2 * 3 * 3  # A, B, W of 3 targets in 2 layers
    torch.testing.assert_close(logits(ours), logits(base), rtol=0, atol=1e-5)
    original = dict(base.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(
        dict(ours.named_parameters())["model.layers.0.self_attn.q_proj.base_layer.weight"], original
    )


def test_pissa_niter_is_a_rank_r_split_close_to_the_exact_one():
    base = llama()
    exact, fast = copy.deepcopy(base), copy.deepcopy(base)
    inject_lora(exact, LoRAConfig(r=4, alpha=8, init="pissa", target_modules=TARGETS))
    torch.manual_seed(0)
    inject_lora(fast, LoRAConfig(r=4, alpha=8, init="pissa_niter_16", target_modules=TARGETS))
    torch.testing.assert_close(logits(fast), logits(base), rtol=0, atol=1e-5)
    exact_delta = exact.model.layers[0].mlp.down_proj.delta_weight("default")
    fast_delta = fast.model.layers[0].mlp.down_proj.delta_weight("default")
    assert torch.linalg.matrix_rank(fast_delta) == 4
    assert fast_delta.norm() / exact_delta.norm() > 0.99  # nearly the top-4 energy of W


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_the_saved_file_is_plain_lora_for_the_original_base_in_peft_and_in_ours(init, tmp_path):
    base = llama()
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, init=init, target_modules=TARGETS))
    expected = logits(trained(ours))
    save_adapter(ours, tmp_path)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (8, 16, True)
    assert load_file(tmp_path / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ].shape == (8, 32)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-5)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=1e-5)


def test_rslora_and_patterns_keep_every_scale_in_the_conversion(tmp_path):
    base = llama()
    ours = copy.deepcopy(base)
    config = LoRAConfig(
        r=4, alpha=8, init="pissa", use_rslora=True, target_modules=TARGETS,
        rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3.0},
    )  # fmt: skip
    inject_lora(ours, config)
    expected = logits(trained(ours))
    save_adapter(ours, tmp_path)
    saved = peft.PeftConfig.from_pretrained(tmp_path)
    assert saved.lora_alpha == pytest.approx(8 * math.sqrt(2))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-5)


def test_the_unconverted_file_names_its_init_and_our_loader_refuses_it_with_the_fix(tmp_path):
    ours = llama()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, init="olora", target_modules=TARGETS))
    save_adapter(ours, tmp_path, convert_base_init=False)
    assert peft.PeftConfig.from_pretrained(tmp_path).init_lora_weights == "olora"
    with pytest.raises(AdapterFileError, match="convert_base_init=True"):
        load_adapter(llama(), tmp_path)


def test_operations_that_would_leave_the_residual_weight_are_refused_and_change_nothing():
    ours = llama()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, init="pissa", target_modules=TARGETS))
    trained(ours)
    before = logits(ours)
    with pytest.raises(LoRAStateError, match="residual"):
        unload_lora(ours, merge=False)
    with pytest.raises(LoRAStateError, match="residual weight"):
        delete_adapter(ours, "default")
    with pytest.raises(LoRAStateError, match="moved part of W"):
        combine_adapters(ours, {"default": 1.0}, "both")
    with pytest.raises(LoRAStateError, match="principal part"):
        resize_adapter(ours, ranks=2)
    with pytest.raises(LoRAStateError, match="initialised from W"):
        ours.model.layers[0].self_attn.q_proj.reset_parameters()
    torch.testing.assert_close(logits(ours), before, rtol=0, atol=0)
    merged = unload_lora(ours, merge=True)  # the one way out: W_res + s·B A, the trained model
    torch.testing.assert_close(logits(merged), before, rtol=0, atol=1e-5)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear


def test_layers_it_cannot_rewrite_are_refused_by_name_before_anything_changes():
    model = nn.Sequential(nn.Linear(8, 8), nn.Embedding(10, 8))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(LoRATargetError, match=r"selects '1' \(Embedding\).*nn.Linear and transformers' Conv1D"):
        inject_lora(model, LoRAConfig(init="pissa", target_modules=["0", "1"]))
    attention = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(LoRATargetError, match="init='olora'"):
        inject_lora(attention, LoRAConfig(init="olora", target_modules=["0"]))
    double = nn.Sequential(nn.Linear(8, 8).double())
    with pytest.raises(LoRATargetError, match="float32, float16 or bfloat16"):
        inject_lora(double, LoRAConfig(init="pissa", target_modules=["0"]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_olora_is_refused_on_gpt2_conv1d_and_pissa_runs_there():
    from tests.tiny_models import gpt2

    case = gpt2()
    with pytest.raises(LoRATargetError, match=r"OLoRA is implemented for nn\.Linear"):
        inject_lora(case.model, LoRAConfig(init="olora", target_modules=case.targets))
    before = case.run(case.model)
    inject_lora(case.model, LoRAConfig(r=4, init="pissa", target_modules=case.targets))
    torch.testing.assert_close(case.run(case.model), before, rtol=0, atol=1e-5)


def test_config_accepts_peft_spellings_and_teaches_the_niter_form():
    assert [changes_base(i) for i in ("pissa", "pissa_niter_8", "olora", "zeros_b", "gaussian")] == [True] * 3 + [
        False
    ] * 2
    for bad in ("pissa_niter_0", "pissa_niter_x", "pisa"):
        with pytest.raises(LoRAConfigError, match="init="):
            LoRAConfig(init=bad)
    with pytest.raises(LoRAConfigError, match="a positive integer: pissa_niter_4"):
        LoRAConfig(init="pissa_niter_")


def test_a_callback_fit_with_pissa_saves_a_file_peft_loads_onto_the_original_model(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    base = llama()

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = copy.deepcopy(base)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    module = LM()
    callback = LoRACallback(r=4, alpha=8, init="pissa", target_modules=TARGETS, adapter_dir=str(tmp_path / "a"))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(IDS.repeat(3, 1)), batch_size=2))
    merged = logits(module.model.eval())  # merged at fit end: the original W + the trained ΔW
    assert type(module.model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not torch.allclose(merged, logits(base))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    torch.testing.assert_close(logits(theirs), merged, rtol=0, atol=1e-4)


def test_hydra_node_sets_pissa():
    from hydra.utils import instantiate

    from tests.test_hydra_config import composed

    assert instantiate(composed("lora.init=pissa_niter_4").lora).config.init == "pissa_niter_4"
