"""Real models as users bring them (transformers models from tiny configs): tied output layers,
shared weights, layers all-linear cannot adapt, exclusions, and PEFT interop on a tied model."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lightning_lora import (
    AdapterFileError,
    LoRALinear,
    LoRAStateError,
    LoRATargetError,
    adapted_weights,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    unload_lora,
)

from .hf_models import as_if_trained, gpt2, ids, llama, logits, pvt, resnet, t5


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------- tied output layers


@pytest.mark.parametrize("build", [llama, t5, gpt2], ids=["llama-tied", "t5", "gpt2"])
def test_all_linear_leaves_out_a_tied_output_layer_so_the_merged_model_equals_the_trained_one(build):
    model = build()
    embedding = model.get_input_embeddings().weight.detach().clone()
    names = inject_lora(model, r=4)
    assert "lm_head" not in names and names  # PEFT's "all-linear": every linear layer but the output layer
    as_if_trained(model)
    trained = logits(model, ids())
    unload_lora(model, merge=True)
    torch.testing.assert_close(logits(model, ids()), trained, rtol=0, atol=1e-5)
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied


def test_all_linear_leaves_out_the_output_layer_of_an_untied_model_too():
    model = llama(tied=False)
    names = inject_lora(model, r=4)
    assert "lm_head" not in names and "model.layers.0.self_attn.q_proj" in names


@pytest.mark.parametrize(
    ("build", "other"),
    [(llama, "model.embed_tokens"), (gpt2, "transformer.wte"), (t5, "shared")],
    ids=["llama-tied", "gpt2", "t5"],
)
def test_an_explicit_target_on_a_tied_lm_head_is_refused_naming_both_modules_and_the_fix(build, other):
    model = build()
    before = snapshot(model)
    with pytest.raises(LoRATargetError) as err:
        inject_lora(model, r=4, target_modules=["lm_head"])
    message = str(err.value)
    assert f"cannot adapt 'lm_head': its weight is the same tensor as '{other}''s (tied embeddings)" in message
    assert "untie the weight before injecting" in message and "tie_word_embeddings=False" in message
    assert unchanged(model, before) and type(model.lm_head) is nn.Linear and not list(adapted_weights(model))


def test_an_untied_lm_head_can_be_targeted_and_merges_exactly():
    model = llama(tied=False)
    inject_lora(model, r=4, target_modules=["lm_head", "q_proj"])
    as_if_trained(model)
    trained = logits(model, ids())
    unload_lora(model, merge=True)
    torch.testing.assert_close(logits(model, ids()), trained, rtol=0, atol=1e-5)


def test_tying_after_injection_makes_the_merge_refuse_and_change_nothing():
    model = llama(tied=False)
    inject_lora(model, r=4, target_modules=["lm_head"])
    as_if_trained(model)
    model.model.embed_tokens.weight = model.lm_head.base_layer.weight  # tied behind LoRA's back
    before = snapshot(model)
    with pytest.raises(
        LoRAStateError, match=r"cannot merge into 'lm_head': its weight is one tensor with \['model\.embed_tokens'\]"
    ):
        merge_lora(model)
    assert unchanged(model, before) and not model.lm_head.merged_adapters


# ------------------------------------------------------------------------- other shared weights


class SharedParameter(nn.Module):
    """Two Linears given one ``nn.Parameter``: aliasing that is not an embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(8, 8), nn.Linear(8, 8)
        self.down.weight = self.up.weight

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("targets", [["up"], "all-linear"])
def test_two_modules_sharing_one_parameter_are_refused(targets):
    model = SharedParameter()
    before = snapshot(model)
    with pytest.raises(
        LoRATargetError, match=r"cannot adapt '(up|down)': its weight is the same tensor as '(down|up)''s"
    ):
        inject_lora(model, r=2, target_modules=targets)
    assert unchanged(model, before) and type(model.up) is nn.Linear


class SharedModule(nn.Module):
    """One Linear registered under two names and called twice: one module, so one adapter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 8)
        self.second = self.first
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.second(torch.tanh(self.first(x))))


def test_a_module_registered_under_two_names_gets_its_adapter_everywhere_it_runs():
    model = SharedModule()
    inject_lora(model, r=2, target_modules=["first"], init="gaussian")
    assert isinstance(model.second, LoRALinear) and model.second is model.first
    as_if_trained(model)
    x = torch.randn(4, 8)
    with torch.no_grad():
        trained = model(x)
        unload_lora(model, merge=True)
        torch.testing.assert_close(model(x), trained, rtol=0, atol=1e-6)
    assert type(model.first) is nn.Linear and model.second is model.first


# ----------------------------------------------------------------------------- exclusions


PVT_TARGETS = ["query", "key", "value", "proj", "dense1", "dense2"]


def test_excluded_modules_are_never_adapted():
    model = pvt()
    names = inject_lora(model, r=4, target_modules=PVT_TARGETS, exclude_modules=["patch_embedding.proj"])
    assert "encoder.layers.0.blocks.0.attention.proj" in names
    assert not any("patch_embedding" in n for n in names)


def with_upsampling_head(model):
    """A segmentation-style head whose transposed conv (a type LoRA cannot adapt) is also
    named ``proj``: the over-match an exclusion is for."""
    model.head = nn.Sequential()
    model.head.add_module("proj", nn.ConvTranspose2d(32, 8, 2, stride=2))
    return model


def test_an_excluded_layer_of_a_type_lora_cannot_adapt_is_never_looked_at():
    model = with_upsampling_head(pvt())
    names = inject_lora(model, r=4, target_modules=PVT_TARGETS, exclude_modules=["head.proj", "patch_embedding.proj"])
    assert "encoder.layers.0.blocks.0.attention.proj" in names and not any("head" in n for n in names)


def test_a_matched_layer_of_another_type_says_how_to_leave_it_out():
    with pytest.raises(
        LoRATargetError,
        match=r"selects 'head\.proj' of type ConvTranspose2d, which LoRA cannot adapt .* "
        r"Leave it out with exclude_modules=\['head\.proj'\]",
    ):
        inject_lora(with_upsampling_head(pvt()), r=4, target_modules=PVT_TARGETS)


# ------------------------------------------------------------------ what all-linear skips


def test_all_linear_on_gpt2_adapts_its_conv1d_layers_and_not_the_tied_head():
    names = inject_lora(gpt2(), r=4)
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" not in names and len(names) == 8


def test_all_linear_warns_listing_the_layer_types_it_leaves_out():
    model = resnet()
    with pytest.warns(
        UserWarning,
        match=r"leaves out \d+ weight layer\(s\) of ResNetForImageClassification, e\.g\. '[\w.]+': Conv2d \(\d+\), "
        r"which it does not count as linear \(PEFT's meaning\): name them in target_modules to adapt them",
    ):
        names = inject_lora(model, r=2)
    assert names == ["classifier.1"]


def test_all_linear_names_the_layers_lora_cannot_adapt_at_all():
    model = with_upsampling_head(pvt())
    with pytest.warns(UserWarning, match=r"ConvTranspose2d \(1\), which LoRA cannot adapt \(exactly; supported: "):
        inject_lora(model, r=2, exclude_modules=["patch_embedding", "dwconv", "spatial_reduction"])


def test_layers_listed_in_exclude_modules_are_not_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert inject_lora(resnet(), r=2, exclude_modules=["convolution"]) == ["classifier.1"]


# --------------------------------------------------------------------- PEFT on a tied model


def test_our_all_linear_adapter_of_a_tied_llama_runs_the_same_in_peft(tmp_path):
    ours = llama()
    inject_lora(ours, r=4)
    as_if_trained(ours)
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids()), logits(ours, ids()), rtol=0, atol=1e-5)
    merged = theirs.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids()), logits(ours, ids()), rtol=0, atol=1e-5)


def test_a_peft_all_linear_adapter_of_a_tied_llama_runs_the_same_in_ours(tmp_path):
    theirs = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    as_if_trained(theirs)
    theirs.save_pretrained(tmp_path)
    ours = llama()
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()), rtol=0, atol=1e-5)
    unload_lora(ours, merge=True)
    torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()), rtol=0, atol=1e-5)


def test_a_peft_adapter_on_a_tied_lm_head_is_refused_with_the_reason(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that merging "can lead to complications", and goes on
        theirs = get_peft_model(llama(), LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
        theirs.save_pretrained(tmp_path, save_embedding_layers=False)  # with them: refused as smuggled weights
    ours = llama()
    before = snapshot(ours)
    with pytest.raises(
        AdapterFileError, match=r"cannot adapt 'lm_head': its weight is the same tensor as 'model\.embed_tokens''s"
    ):
        load_adapter(ours, tmp_path)
    assert unchanged(ours, before) and not list(adapted_weights(ours))


def test_peft_itself_merges_a_tied_lm_head_adapter_into_the_embedding_too():
    """Why we refuse: PEFT 0.21 adapts a tied lm_head when asked, and its merged model is not
    the trained one (the embedding moved as well). If PEFT changes this, revisit the README."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(llama(), LoraConfig(r=4, target_modules=["lm_head"])).eval()
        as_if_trained(theirs)
        trained = logits(theirs, ids())
        merged = copy.deepcopy(theirs).merge_and_unload()
    assert (logits(merged, ids()) - trained).abs().max() > 0.1
