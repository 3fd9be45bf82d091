"""LoRA on nn.Embedding: the update is a dense ΔWᵀ in the table, ``padding_idx`` keeps its vector,
merge and unload give back the plain embedding, PEFT's files both ways (``lora_embedding_A``),
tied input/output embeddings are never merged into, and what cannot be adapted exactly is refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lightning_lora import (
    AdapterFileError,
    LoRAStateError,
    LoRATargetError,
    adapted_weights,
    inject_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    read_adapter,
    save_adapter,
    unload_lora,
)
from lightning_lora.export import merge_into_state_dict
from lightning_lora.layer_types import LoRAEmbedding
from lightning_lora.state import has_lora

from .tiny_models import gpt2, randomize, types_and_keys

IDS = torch.tensor([[0, 1, 2, 3], [4, 0, 9, 9]])


def adapted(**embedding_args):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6, **embedding_args))
    base = copy.deepcopy(model)
    inject_lora(model, r=2, alpha=4, target_modules=["0"])
    return model, base


def test_update_equals_a_dense_delta_in_the_table():
    model, base = adapted()
    randomize(model, std=0.3)
    layer = model[0]
    assert isinstance(layer, LoRAEmbedding)
    # PEFT's layout: A (r, num_embeddings), B (embedding_dim, r)
    assert tuple(layer.lora_A["default"].shape) == (2, 10) and tuple(layer.lora_B["default"].shape) == (6, 2)
    A, B, scale = layer.update("default")
    with torch.no_grad():
        expected = F.embedding(IDS, base[0].weight + (scale * B @ A).T)
        torch.testing.assert_close(model(IDS), expected, rtol=0, atol=1e-6)


def test_merge_equals_unmerged_forward_and_unload_gives_back_the_plain_embedding():
    model, base = adapted(padding_idx=0)
    randomize(model, std=0.3)
    with torch.no_grad():
        unmerged = model(IDS)
        merge_lora(model)
        torch.testing.assert_close(model(IDS), unmerged, rtol=0, atol=1e-6)
        unload_lora(model)
        torch.testing.assert_close(model(IDS), unmerged, rtol=0, atol=1e-6)
    assert type(model[0]) is nn.Embedding and model[0].padding_idx == 0
    assert types_and_keys(model) == types_and_keys(base)


def test_zeros_b_starts_at_the_base_model_with_a_unit_gaussian_A():
    model, base = adapted()
    A = model[0].lora_A["default"]
    assert torch.equal(model(IDS), base(IDS)) and 0.5 < A.std() < 2  # N(0, 1) rows, as nn.Embedding draws
    assert not model[0].lora_B["default"].any()


def test_training_never_changes_the_padding_vector():
    model, base = adapted(padding_idx=0)
    assert not model[0].lora_A["default"][:, 0].any()
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(IDS).square().sum().backward()
        assert not model[0].lora_A["default"].grad[:, 0].any()
        optimizer.step()
    assert model[0].lora_B["default"].abs().sum() > 0  # it trained ...
    with torch.no_grad():
        torch.testing.assert_close(model(IDS)[IDS == 0], base(IDS)[IDS == 0], rtol=0, atol=0)  # ... but not the pad
        unload_lora(model, merge=True)
    assert torch.equal(model[0].weight[0], base[0].weight[0])
    assert not torch.equal(model[0].weight[1:], base[0].weight[1:])


def test_dropout_does_not_apply_to_token_ids():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6))
    inject_lora(model, r=2, target_modules=["0"], dropout=0.5)
    randomize(model)
    model.train()
    assert torch.equal(model(IDS), model(IDS))


class ScaledEmbedding(nn.Embedding):
    """Scales its output (as Gemma's embeddings do): an update in W would be scaled too."""

    def forward(self, ids):
        return super().forward(ids) * 4.0


@pytest.mark.parametrize(
    ("embedding", "message"),
    [
        (nn.Embedding(10, 6, max_norm=1.0), r"max_norm=1\.0: its forward renormalises the looked-up rows"),
        (ScaledEmbedding(10, 6), r"ScaledEmbedding subclasses Embedding with a forward of its own"),
    ],
)
def test_an_embedding_lora_cannot_adapt_exactly_is_refused_and_nothing_changes(embedding, message):
    model = nn.Sequential(embedding)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LoRATargetError, match=rf"selects '0' \({type(embedding).__name__}\), .*{message}"):
        inject_lora(model, target_modules=["0"])
    assert not has_lora(model) and type(model[0]) is type(embedding)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_all_linear_leaves_embeddings_to_be_named():
    case = gpt2()
    names = inject_lora(copy.deepcopy(case.model), target_modules="all-linear")
    assert "wte" not in names and "wpe" not in names


def test_an_embedding_file_does_not_load_into_another_layer_type(tmp_path):
    model, _ = adapted()
    save_adapter(model, tmp_path)
    other = nn.Sequential(nn.Linear(10, 6))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(AdapterFileError, match=r"has lora_embedding_A/B tensors for it, but it is of type Linear"):
        load_adapter(other, tmp_path)
    assert not has_lora(other) and all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


# --------------------------------------------------------------------------------- tied weights


@pytest.mark.parametrize(("target", "other"), [("wte", "lm_head"), ("lm_head", "transformer.wte")])
def test_a_tied_weight_is_refused_at_injection(target, other):
    """GPT-2's ``wte`` and ``lm_head`` share one tensor: ΔW merged for one would reach the other,
    so the adapter is refused at step 0 instead of at the merge after training (test_real_models.py)."""
    model = gpt2(tie=True, lm_head=True).model
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LoRATargetError, match=rf"its weight is the same tensor as '{other}''s \(tied embeddings\)"):
        inject_lora(model, r=2, target_modules=[target], init="gaussian")
    assert not has_lora(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_weight_tied_after_injection_is_never_merged_into():
    case = gpt2(tie=False, lm_head=True)
    model = case.model
    inject_lora(model, r=2, target_modules=["wte"], init="gaussian")
    model.lm_head.weight = model.transformer.wte.base_layer.weight  # tied behind LoRA's back
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        unmerged = case.run(model)
    with pytest.raises(LoRAStateError, match=r"tied weights\), so ΔW would change 'lm_head' as well"):
        unload_lora(model, merge=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(t.layer.merged_adapters for t in adapted_weights(model))
    unload_lora(model, merge=False)  # the way out the message names
    with torch.no_grad():
        assert not torch.equal(case.run(model), unmerged)  # back to the base model


# ------------------------------------------------------------------------------ PEFT interop


def test_peft_loads_our_embedding_adapters_with_our_outputs(tmp_path):
    case = gpt2()
    ours = copy.deepcopy(case.model)
    inject_lora(ours, r=4, alpha=8, target_modules=["wte", "wpe"])
    randomize(ours)
    save_adapter(ours, tmp_path)
    assert sorted(read_adapter(tmp_path).embedding) == ["wpe", "wte"]
    peft = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path).eval()
    with torch.no_grad():
        expected = case.run(ours)
        torch.testing.assert_close(case.run(peft), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(case.run(peft.merge_and_unload()), expected, rtol=0, atol=1e-5)


def test_we_load_peft_embedding_adapters_with_peft_outputs(tmp_path):
    case = gpt2()
    peft = get_peft_model(copy.deepcopy(case.model), LoraConfig(r=4, lora_alpha=8, target_modules=["wte", "wpe"]))
    randomize(peft)
    peft.eval().save_pretrained(tmp_path)
    ours = copy.deepcopy(case.model)
    assert load_adapter(ours, tmp_path) == ["wte", "wpe"]
    with torch.no_grad():
        expected = case.run(peft)
        torch.testing.assert_close(case.run(ours), expected, rtol=0, atol=1e-5)
        unload_lora(ours, merge=True)
        torch.testing.assert_close(case.run(ours), expected, rtol=0, atol=1e-5)
    assert types_and_keys(ours) == types_and_keys(case.model)


def test_merging_an_embedding_file_into_a_checkpoint_equals_merging_the_model(tmp_path):
    case = gpt2()
    ours = copy.deepcopy(case.model)
    inject_lora(ours, r=4, target_modules=["wte"])
    randomize(ours)
    save_adapter(ours, tmp_path)
    merged = merge_into_state_dict(case.model.state_dict(), read_adapter(tmp_path))
    unload_lora(ours, merge=True)
    assert not torch.equal(merged["wte.weight"], case.model.state_dict()["wte.weight"])
    torch.testing.assert_close(merged["wte.weight"], ours.state_dict()["wte.weight"], rtol=0, atol=1e-6)
