"""DoRA's fast path against its reference formula: same outputs, same gradients of x, A, B and
the magnitude, the norms from the r-sized factors equal to the norms of W + s·BA, and the cached
‖W‖² never stale."""

import pytest
import torch
from torch import nn

from lightning_lora import AdapterSpec, LoRALinear, merge_lora, unmerge_lora
from lightning_lora.delta import weight_norm
from lightning_lora.fused_dora import row_norms


def adapted(d_in=24, d_out=20, r=4, dtype=torch.float32, bias=True, dropout=0.0):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=bias, dtype=dtype))
    layer.base_layer.requires_grad_(False)
    spec = AdapterSpec(r=r, alpha=8.0, dropout=dropout, init="gaussian", use_dora=True)
    layer.add_adapter("default", spec, dtype=dtype)
    layer.set_active(["default"])
    with torch.no_grad():  # a trained size of B, and m moved away from its starting norms
        layer.lora_B["default"].mul_(10)
        layer.lora_magnitude_vector["default"].mul_(torch.linspace(0.5, 1.5, d_out, dtype=dtype))
    return layer


def outputs_and_grads(layer, x, run):
    x = x.detach().clone().requires_grad_(True)
    y = run(layer, x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    (y * w).sum().backward()
    params = (layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"])
    grads = (x.grad, *(p.grad.clone() for p in params))
    for p in params:
        p.grad = None
    return y.detach(), grads


def uses_fast_path(y):
    return "DoRALinearFunction" in type(y.grad_fn).__name__


@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_matches_the_reference_in_fp32(bias):
    layer = adapted(bias=bias).train()
    x = torch.randn(3, 5, 24)
    assert uses_fast_path(layer(x.requires_grad_()))
    y_fast, g_fast = outputs_and_grads(layer, x, lambda m, x: m(x))
    y_ref, g_ref = outputs_and_grads(layer, x, lambda m, x: m.reference_forward(x))
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    for fast, ref in zip(g_fast, g_ref, strict=True):  # x, A, B, m
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fast_path_matches_the_reference_in_bf16_and_under_autocast():
    layer = adapted(d_in=64, d_out=48, r=8, dtype=torch.bfloat16)
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    y_fast, g_fast = outputs_and_grads(layer, x, lambda m, x: m(x))
    y_ref, g_ref = outputs_and_grads(layer, x, lambda m, x: m.reference_forward(x))
    for fast, ref in zip((y_fast, *g_fast), (y_ref, *g_ref), strict=True):
        assert relative(fast, ref) < 1e-2

    layer = adapted(d_in=64, d_out=48, r=8)  # fp32 weights, bf16 autocast: bf16-mixed

    def under_autocast(run):
        def go(m, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return run(m, x)

        return go

    x = torch.randn(4, 16, 64)
    y_fast, g_fast = outputs_and_grads(layer, x, under_autocast(lambda m, x: m(x)))
    y_ref, g_ref = outputs_and_grads(layer, x, under_autocast(lambda m, x: m.reference_forward(x)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert uses_fast_path(layer(x.requires_grad_()))
    assert g_fast[3].dtype == torch.float32  # the magnitude's gradient as it is stored
    for fast, ref in zip((y_fast, *g_fast), (y_ref, *g_ref), strict=True):
        assert relative(fast, ref) < 1e-2


def test_norms_from_the_factors_equal_the_norms_of_the_formed_sum():
    layer = adapted(d_in=96, d_out=40, r=8, dtype=torch.float64)
    A, B, s = layer.update("default")
    expected = weight_norm(layer.base_layer.weight, (A, B, s))
    torch.testing.assert_close(row_norms(layer.base_layer.weight, A, B, s, {}), expected.float())


def test_the_cached_weight_norm_follows_a_merge_and_unmerge_of_w():
    layer = adapted(bias=False)
    other = "other"
    layer.add_adapter(other, AdapterSpec(r=2, alpha=4.0, init="gaussian"))
    with torch.no_grad():
        layer.lora_B[other].normal_()
    x = torch.randn(6, 24)
    layer.eval()
    before = layer(x)  # fills the cache from W
    layer.set_active([other])
    merge_lora(layer)  # W changes in place: another version
    layer.set_active(["default"])
    torch.testing.assert_close(layer(x), layer.reference_forward(x))
    assert not torch.allclose(layer(x), before)  # the norms of the new W, not the cached old ones
    unmerge_lora(layer)
    torch.testing.assert_close(layer(x), before)


def test_dropout_while_training_takes_the_reference_path_and_draws_its_mask_once():
    layer = adapted(dropout=0.3).train()
    x = torch.randn(6, 24, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    torch.testing.assert_close(y, layer.reference_forward(x))
    assert not uses_fast_path(y)
    assert uses_fast_path(layer.eval()(x))  # no dropout at eval: the fast path


def test_the_fast_path_keeps_no_output_sized_tensor_beside_the_output():
    """Saved for backward beyond the input and the r-sized intermediate: the output itself."""
    layer = adapted(d_in=32, d_out=64, r=4, bias=False)
    x = torch.randn(128, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    big = [t for t in saved if t.numel() >= 128 * 64]
    assert len(big) == 1 and big[0].data_ptr() == y.data_ptr()
