"""The LoRA math of one layer, checked against the formulas of the seeds and the paper."""

import math

import pytest
import torch
from torch import nn

from lightning_lora import AdapterSpec, LoRALinear, LoRAParametrization
from lightning_lora.delta import init_lora_


def lora_linear(d_in=16, d_out=12, r=4, alpha=8.0, dropout=0.0, init="zeros_b", dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=bias, dtype=dtype))
    layer.add_adapter("default", AdapterSpec(r=r, alpha=alpha, dropout=dropout, init=init), dtype=dtype)
    layer.set_active(["default"])
    return layer


def test_seed_arithmetic_d1000_r10_is_20000_parameters_50x_fewer():
    layer = LoRALinear(nn.Linear(1000, 1000, bias=False))
    layer.add_adapter("default", AdapterSpec(r=10, alpha=10))
    lora = layer.lora_A["default"].numel() + layer.lora_B["default"].numel()
    full = layer.base_layer.weight.numel()
    assert (lora, full, full // lora) == (20_000, 1_000_000, 50)
    assert layer.lora_A["default"].shape == (10, 1000)  # A: (r, d_in)
    assert layer.lora_B["default"].shape == (1000, 10)  # B: (d_out, r)


def test_zero_b_leaves_the_output_exactly_the_base_output():
    layer = lora_linear()
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_a_is_kaiming_uniform_like_nn_linear_and_b_is_zero():
    A, B = torch.empty(64, 256), torch.empty(128, 64)
    init_lora_(A, B, "zeros_b")
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) == nn.Linear's bound
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(B) == 0


def test_gaussian_init_changes_the_output_at_step_zero():
    layer = lora_linear(init="gaussian", d_in=256, d_out=256, r=64)
    assert layer.lora_A["default"].std().item() == pytest.approx(0.01, rel=0.05)
    assert layer.lora_B["default"].std().item() == pytest.approx(0.01, rel=0.05)
    x = torch.randn(4, 256)
    assert not torch.equal(layer(x), layer.base_layer(x))


def test_forward_is_the_formula():
    layer = lora_linear(init="gaussian")
    x = torch.randn(3, 7, 16)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    W, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ W.T + b + (8.0 / 4) * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_only_a_and_b_receive_gradients_when_the_base_is_frozen():
    layer = lora_linear(init="gaussian")
    layer.base_layer.requires_grad_(False)
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lora_A["default"].grad is not None and layer.lora_B["default"].grad is not None


def test_dropout_acts_on_the_adapter_input_only_in_training():
    layer = lora_linear(init="gaussian", dropout=0.5)
    x = torch.randn(8, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    expected = layer.base_layer(x) + 2.0 * layer.lora_output(x, "default")
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    torch.manual_seed(1)
    assert not torch.allclose(layer(x), expected)


def test_merge_equals_unmerged_forward_fp32():
    layer = lora_linear(init="gaussian")
    x = torch.randn(6, 16)
    before = layer(x)
    layer.merge(layer.host_weight(), ["default"])
    assert layer.unmerged_active() == []
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), before, rtol=0, atol=1e-5)


def test_unmerge_restores_w_fp32():
    layer = lora_linear(init="gaussian")
    original = layer.base_layer.weight.detach().clone()
    layer.merge(layer.host_weight(), ["default"])
    assert not torch.equal(layer.base_layer.weight, original)
    layer.unmerge(layer.host_weight())
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)


def test_merge_and_unmerge_bf16_stay_within_bf16_rounding():
    layer = lora_linear(init="gaussian", dtype=torch.bfloat16, d_in=64, d_out=64, r=8)
    with torch.no_grad():  # an adapter of a realistic size relative to W
        layer.lora_B["default"].mul_(10)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    before = layer(x).float()
    original = layer.base_layer.weight.detach().float().clone()
    layer.merge(layer.host_weight(), ["default"])
    # bf16 has 8 significant bits: eps = 2**-7 relative; the sum over 64 inputs adds roundings.
    assert (layer(x).float() - before).abs().max() <= 2**-7 * before.abs().max() * 2
    layer.unmerge(layer.host_weight())
    delta = (layer.delta_weight("default")).abs()
    bound = 2**-8 * (original.abs() + delta) * 2  # half an ulp of |W|+|ΔW|, twice (merge, unmerge)
    assert ((layer.base_layer.weight.float() - original).abs() <= bound + 1e-12).all()


def test_adapter_dtype_follows_the_given_dtype_and_output_keeps_the_input_dtype():
    layer = LoRALinear(nn.Linear(8, 8, dtype=torch.bfloat16))
    layer.add_adapter("fp32", AdapterSpec(r=2, alpha=2, init="gaussian"), dtype=torch.float32)
    layer.set_active(["fp32"])
    y = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert layer.lora_A["fp32"].dtype == torch.float32 and y.dtype == torch.bfloat16


def test_reset_parameters_materialises_meta_adapters():
    layer = LoRALinear(nn.Linear(8, 8, device="meta"))
    layer.add_adapter("default", AdapterSpec(r=2, alpha=2), device="meta")
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.count_nonzero(layer.lora_B["default"]) == 0
    assert torch.count_nonzero(layer.lora_A["default"]) > 0


def test_linear_subclass_keeps_its_own_forward():
    class Clamped(nn.Linear):
        def forward(self, x):
            return super().forward(x).clamp(min=0)

    layer = LoRALinear(Clamped(4, 4))
    layer.add_adapter("default", AdapterSpec(r=2, alpha=2))
    layer.set_active(["default"])
    assert (layer(torch.randn(16, 4)) >= 0).all()


def test_parametrization_adds_delta_to_its_row_block_only():
    p = LoRAParametrization(4, 6, rows=(4, 8), label="k")
    p.add_adapter("default", AdapterSpec(r=2, alpha=6, init="gaussian"))
    p.set_active(["default"])
    W = torch.randn(12, 6)
    out = p(W)
    torch.testing.assert_close(out[4:8], W[4:8] + 3.0 * p.lora_B["default"] @ p.lora_A["default"])
    assert torch.equal(out[:4], W[:4]) and torch.equal(out[8:], W[8:])


def test_several_active_adapters_add_their_updates():
    layer = lora_linear(init="gaussian")
    layer.add_adapter("other", AdapterSpec(r=2, alpha=1, init="gaussian"))
    x = torch.randn(3, 16)
    layer.set_active(["default", "other"])
    both = layer(x)
    expected = layer.base_layer(x) + 2.0 * layer.lora_output(x, "default") + 0.5 * layer.lora_output(x, "other")
    torch.testing.assert_close(both, expected)
