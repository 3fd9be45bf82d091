"""Copies of an adapted model are independent: merge, unmerge or unload one, the other is intact.

torch's parametrize gives a deep copy the same generated ``Parametrized*`` class as the
original; removing a parametrization deletes a property from that class. Each carrier below is
copied, changed on one side, and the other side must run and compute exactly what it did."""

import copy

import pytest
import torch
from torch import nn

from lightning_lora import inject_lora, merge_lora, unload_lora, unmerge_lora

from .hf_models import MHANet, as_if_trained


def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 4)).eval()


CARRIERS = {
    "multihead-attention": (lambda: MHANet().eval(), {"target_modules": ["attn", "cross"]}),
    "encoder-layer": (encoder, {"target_modules": "all-linear"}),  # MHA, linear1/linear2, and a plain Linear
    "separate-qkv": (lambda: MHANet(kdim=16).eval(), {"target_modules": ["attn"]}),
}
CHANGES = {
    "unload-merged": lambda m: unload_lora(m, merge=True),
    "unload-unmerged": lambda m: unload_lora(m, merge=False),
    "merge": merge_lora,
    "merge-unmerge": lambda m: (merge_lora(m), unmerge_lora(m)),
}


def run(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("changed", ["copy", "original"])
def test_changing_one_copy_leaves_the_other_intact(carrier, change, changed):
    build, config = CARRIERS[carrier]
    original = build()
    inject_lora(original, r=4, **config)
    as_if_trained(original)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    expected = run(original, x)
    duplicate = copy.deepcopy(original)
    touched, kept = (duplicate, original) if changed == "copy" else (original, duplicate)
    CHANGES[change](touched)
    assert torch.equal(run(kept, x), expected)
    if change != "unload-unmerged":  # the changed copy still computes the adapted model
        torch.testing.assert_close(run(touched, x), expected, rtol=0, atol=1e-5)
    unload_lora(kept, merge=True)  # and the kept one can still be taken apart itself
    torch.testing.assert_close(run(kept, x), expected, rtol=0, atol=1e-5)


def test_a_second_adapter_on_a_copy_does_not_reach_the_original():
    original = MHANet(kdim=16).eval()
    inject_lora(original, r=2, target_modules=["attn"], mha_projections=["q"])
    duplicate = copy.deepcopy(original)
    inject_lora(duplicate, r=2, target_modules=["attn"], mha_projections=["k"], adapter_name="second")
    x = torch.randn(2, 5, 32)
    assert not hasattr(type(original.attn), "k_proj_weight")  # the new property lives on the copy's class only
    run(original, x)
    unload_lora(original, merge=False)
    run(duplicate, x)
