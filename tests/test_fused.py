"""The fast path of LoRALinear against the plain formula: same outputs, same gradients, and it
compiles without graph breaks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora import AdapterSpec, LoRALinear, inject_lora, lora_parameters
from lightning_lora.fused import LoRALinearFunction, fast_path, fast_path_mode, set_fast_path


def adapted(d_in=24, d_out=20, r=4, alpha=8.0, dropout=0.0, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=bias, dtype=dtype))
    layer.base_layer.requires_grad_(False)
    layer.add_adapter("default", AdapterSpec(r=r, alpha=alpha, dropout=dropout, init="gaussian"), dtype=dtype)
    layer.set_active(["default"])
    with torch.no_grad():  # B of a trained size, so the update is not negligible next to W x
        layer.lora_B["default"].mul_(10)
    return layer


def formula(layer, x, x_adapter=None):
    """y = x Wᵀ + b + (alpha/r) · x_adapter Aᵀ Bᵀ, written out with plain tensor ops."""
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    xa = x if x_adapter is None else x_adapter
    y = x @ W.T + layer.scaling["default"] * (xa @ A.T) @ B.T
    return y if b is None else y + b


def outputs_and_grads(layer, x, run):
    """run(layer, x) -> y; returns y and the gradients of a fixed random loss w.r.t. x, A, B."""
    x = x.detach().clone().requires_grad_(True)
    y = run(layer, x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32).to(y.dtype)
    (y * w).sum().backward()
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    grads = (x.grad, A.grad.clone(), B.grad.clone())
    A.grad = B.grad = None
    return y.detach(), grads


def uses_fast_path(y):
    return y.grad_fn is not None and "LoRALinearFunction" in type(y.grad_fn).__name__


@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_matches_the_formula_in_fp32(bias):
    layer = adapted(bias=bias)
    x = torch.randn(3, 5, 24)
    y_fast, g_fast = outputs_and_grads(layer, x, lambda m, x: m(x))
    y_ref, g_ref = outputs_and_grads(layer, x, formula)
    assert uses_fast_path(layer(x.requires_grad_()))
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    for fast, ref in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_fast_path_matches_the_reference_path_in_bf16():
    layer = adapted(d_in=64, d_out=48, r=8, dtype=torch.bfloat16)
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    y_fast, g_fast = outputs_and_grads(layer, x, lambda m, x: m(x))
    y_ref, g_ref = outputs_and_grads(layer, x, lambda m, x: m.reference_forward(x))
    assert y_fast.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits; sums over 64 inputs round differently in the two orders.
    for fast, ref in zip((y_fast, *g_fast), (y_ref, *g_ref), strict=True):
        rel = (fast.float() - ref.float()).norm() / ref.float().norm()
        assert rel < 1e-2, rel


def test_dropout_fast_path_draws_the_same_mask_and_matches_the_reference():
    layer = adapted(dropout=0.3).train()
    x = torch.randn(6, 24)

    def fast(m, x):
        torch.manual_seed(123)
        return m(x)

    def reference(m, x):
        torch.manual_seed(123)
        return m.reference_forward(x)

    def by_hand(m, x):
        torch.manual_seed(123)
        return formula(m, x, F.dropout(x, p=0.3, training=True))

    y_fast, g_fast = outputs_and_grads(layer, x, fast)
    assert uses_fast_path(fast(layer, x.clone().requires_grad_()))
    for run in (reference, by_hand):
        y_ref, g_ref = outputs_and_grads(layer, x, run)
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_fast, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the mask really drops something: without dropout the output differs
    assert not torch.allclose(y_fast, formula(layer, x).detach())


def test_without_input_grad_only_a_and_b_get_gradients():
    layer = adapted()
    y = layer(torch.randn(8, 24))
    assert uses_fast_path(y)
    y.sum().backward()
    assert layer.lora_A["default"].grad is not None and layer.lora_B["default"].grad is not None
    assert layer.base_layer.weight.grad is None


def test_no_grad_and_inference_mode_run_the_fast_path_formula():
    layer = adapted()
    x = torch.randn(5, 24)
    expected = formula(layer, x).detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


class Clamped(nn.Linear):
    def forward(self, x):
        return super().forward(x).clamp(min=-1)


def _fallback_cases():
    def subclass():
        layer = adapted()
        base = Clamped(24, 20)
        base.load_state_dict(layer.base_layer.state_dict())
        layer.base_layer = base.requires_grad_(False)
        return layer, torch.float32

    def trainable_base():
        layer = adapted()
        layer.base_layer.weight.requires_grad_(True)
        return layer, torch.float32

    def hooked():
        layer = adapted()
        layer.base_layer.register_forward_hook(lambda m, i, o: o * 2)
        return layer, torch.float32

    def fp32_adapter_on_bf16_base():
        layer = LoRALinear(nn.Linear(24, 20, dtype=torch.bfloat16).requires_grad_(False))
        layer.add_adapter("default", AdapterSpec(r=4, alpha=8, init="gaussian"), dtype=torch.float32)
        layer.set_active(["default"])
        return layer, torch.bfloat16

    def two_adapters():
        layer = adapted()
        layer.add_adapter("other", AdapterSpec(r=2, alpha=2, init="gaussian"))
        layer.set_active(["default", "other"])
        return layer, torch.float32

    return {
        "subclass": subclass,
        "trainable_base": trainable_base,
        "hooked": hooked,
        "fp32_adapter_on_bf16_base": fp32_adapter_on_bf16_base,
        "two_adapters": two_adapters,
    }


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_layers_the_fast_path_cannot_serve_take_the_reference_path(case):
    layer, dtype = _fallback_cases()[case]()
    x = torch.randn(4, 24, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert not uses_fast_path(y)
    torch.testing.assert_close(y, layer.reference_forward(x))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_autocast_takes_the_fast_path_and_matches_the_reference_under_autocast(dropout):
    """bf16-mixed (autocast over fp32 weights and adapters): the fast path casts once, as
    autocast casts a linear's inputs, and its gradients reach the fp32 A and B."""
    layer = adapted(d_in=64, d_out=48, r=8, dropout=dropout).train()
    x = torch.randn(4, 16, 64)

    def under_autocast(run):
        def go(m, x):
            torch.manual_seed(3)  # the same dropout mask in both
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return run(m, x)

        return go

    y_fast, g_fast = outputs_and_grads(layer, x, under_autocast(lambda m, x: m(x)))
    y_ref, g_ref = outputs_and_grads(layer, x, under_autocast(lambda m, x: m.reference_forward(x)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.requires_grad_())
    assert uses_fast_path(y)
    assert y_fast.dtype == y_ref.dtype == torch.bfloat16
    assert g_fast[1].dtype == g_fast[2].dtype == torch.float32  # A.grad, B.grad as stored
    for fast, ref in zip((y_fast, *g_fast), (y_ref, *g_ref), strict=True):
        rel = (fast.float() - ref.float()).norm() / ref.float().norm()
        assert rel < 1e-2, rel


def test_autocast_runs_the_function_on_tensors_cast_once():
    layer = adapted(d_in=64, d_out=48)
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert uses_fast_path(y) and y.dtype == torch.bfloat16


def test_autocast_leaves_float64_to_the_reference_path():
    layer = adapted(dtype=torch.float64)
    x = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert not uses_fast_path(y)
    torch.testing.assert_close(y, layer.reference_forward(x))


def test_fast_path_mode_never_and_restore():
    layer = adapted()
    x = torch.randn(4, 24, requires_grad=True)
    assert fast_path_mode() == "auto"
    with fast_path("never"):
        assert not uses_fast_path(layer(x))
    assert fast_path_mode() == "auto" and uses_fast_path(layer(x))
    with pytest.raises(ValueError, match="one of"):
        set_fast_path("sometimes")


class Block(nn.Module):
    """A transformer-shaped block: q/k/v share an input, an MLP with a gated product."""

    def __init__(self, d=32, hidden=48):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        att = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h), is_causal=True)
        x = x + self.o(att)
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_adapted_block_compiles_with_fullgraph_and_matches_eager(mode):
    torch.manual_seed(0)
    block = Block()
    inject_lora(block, r=4, alpha=8, target_modules="all-linear", init="gaussian")
    x = torch.randn(2, 8, 32, requires_grad=True)

    def step(fn):
        out = fn(x)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in lora_parameters(block)] + [x.grad.clone()]
        for p in [*lora_parameters(block), x]:
            p.grad = None
        return out.detach(), grads

    torch._dynamo.reset()
    with fast_path(mode):
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # a graph break raises
        y_c, g_c = step(compiled)
        y_e, g_e = step(block)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_function_backward_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    xd = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: LoRALinearFunction.apply(x, W, b, A, B, 1.5, None), (x, A, B))
    assert torch.autograd.gradcheck(
        lambda x, A, B, xd: LoRALinearFunction.apply(x, W, None, A, B, 0.5, xd), (x, A, B, xd)
    )
