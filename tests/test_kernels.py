"""The Triton kernels of the fast path, run on CPU through Triton's interpreter: the same results
as the formulas they replace, for tile-unaligned shapes, ranks 1 to 128 and strided inputs, and
through LoRALinearFunction on a real Llama. The GPU run (experiments/benchmark) is the proof of
speed; here only the logic is checked.

Under the interpreter bf16 dots come out wrong (Triton 3.9 treats them as raw integers), so the
kernels are checked in fp16 here, and in bf16 on the GPU."""

import pytest
import torch

pytest.importorskip("triton")

from lightning_lora import inject_lora, kernels
from lightning_lora.fused import fast_path
from tests.hf_models import llama

if not kernels.interpreting() or type(kernels._gemm_lowrank).__name__ != "InterpretedFunction":
    pytest.skip(
        "the kernels were defined without TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True
    )

HALF = torch.float16


def rand(*shape, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(HALF)


def close(got, want, what):
    """fp16 output against an fp32 reference: within a few fp16 roundings of the largest value."""
    err = (got.float() - want).abs().max().item()
    assert err <= 4e-3 * max(1.0, want.abs().max().item()), f"{what}: max |error| {err}"


@pytest.fixture(autouse=True)
def forced():
    # A Trainer(deterministic=True) earlier in the suite leaves torch's deterministic mode on,
    # which (rightly) keeps the atomic gradient kernel off: these tests start from it off.
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        with kernels.triton_kernels("always"):
            yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("r", [1, 3, 16, 64, 128])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_lowrank_is_the_frozen_gemm_plus_the_scaled_lowrank_term(r, bias):
    M, d_in, d_out, s = 70, 40, 50, 2.0  # none a multiple of the 32-wide interpreter tile
    x, W = rand(M, d_in, seed=1), rand(d_out, d_in, scale=0.2, seed=2)
    a, B = rand(M, r, seed=3), rand(d_out, r, scale=0.2, seed=4)
    b = rand(d_out, seed=5) if bias else None
    y = kernels.gemm_lowrank(x, W.t(), a, B.t(), b, s)
    want = x.float() @ W.float().t() + s * a.float() @ B.float().t()
    close(y, want if b is None else want + b.float(), f"r={r}")
    assert y.shape == (M, d_out) and y.is_contiguous()


def test_gemm_lowrank_reads_strided_inputs_and_shapes_its_output():
    base = rand(6, 11, 80, seed=1)
    x = base[:, :, 7:47]  # (6, 11, 40), a row stride of 80: not contiguous
    W, A, B = rand(30, 40, scale=0.2, seed=2), rand(5, 40, scale=0.2, seed=3), rand(30, 5, scale=0.2, seed=4)
    x2 = x.reshape(-1, 40)
    assert not x2.is_contiguous()
    a = x2 @ A.t()
    y = kernels.gemm_lowrank(x2, W.t(), a, B.t(), None, 0.5, lead=[6, 11])
    assert y.shape == (6, 11, 30) and y._base is None  # allocated in its shape, no view
    close(y, x.float() @ W.float().t() + 0.5 * (a.float() @ B.float().t()).view(6, 11, 30), "strided")


def test_gemm_lowrank_as_the_dgrad_is_dy_w_plus_g_a():
    M, d_in, d_out, r = 45, 56, 36, 8
    dy, W, g, A = (
        rand(M, d_out, seed=1),
        rand(d_out, d_in, scale=0.2, seed=2),
        rand(M, r, seed=3),
        rand(r, d_in, seed=4),
    )
    dx = kernels.gemm_lowrank(dy, W, g, A, None, 1.0)
    close(dx, dy.float() @ W.float() + g.float() @ A.float(), "dgrad")


@pytest.mark.parametrize(("M", "d_out", "r"), [(20, 100, 3), (150, 70, 16), (33, 64, 128), (64, 33, 1)])
def test_lowrank_grads_are_g_and_db_from_one_pass(M, d_out, r):
    # M ≤ 32 gives one row block, so the columns split across programs whose partial g add up.
    dy, B, a, s = rand(M, d_out, seed=1), rand(d_out, r, scale=0.2, seed=2), rand(M, r, seed=3), 1.5
    g, dB = kernels.lowrank_grads(dy, B, a, s)
    assert g.dtype == dB.dtype == HALF and g.shape == (M, r) and dB.shape == (d_out, r)
    close(g, s * dy.float() @ B.float(), "g")
    close(dB, s * dy.float().t() @ a.float(), "dB")


def test_lowrank_grads_read_a_transposed_dy():
    dy = rand(48, 40, seed=1).t()  # (40, 48) with column-major strides
    B, a = rand(48, 4, scale=0.2, seed=2), rand(40, 4, seed=3)
    g, dB = kernels.lowrank_grads(dy, B, a, 2.0)
    close(g, 2.0 * dy.float() @ B.float(), "g")
    close(dB, 2.0 * dy.float().t() @ a.float(), "dB")


def calls(monkeypatch):
    """Counts the kernel launches LoRALinearFunction makes (a spy; the kernels still run)."""
    seen = {"gemm_lowrank": 0, "lowrank_grads": 0}
    for name in seen:
        real = getattr(kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return seen


def llama_step(seed=0):
    """A tied fp16 Llama with r=8 on every projection: logits and every adapter gradient."""
    model = llama(seed=seed)
    inject_lora(model, r=8, alpha=16, init="gaussian")
    model.to(HALF)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return logits.float().detach(), grads


def test_llama_trained_through_the_kernels_matches_cublas(monkeypatch):
    with kernels.triton_kernels("never"):
        want_logits, want = llama_step()
    seen = calls(monkeypatch)
    got_logits, got = llama_step()
    projections = 2 * 7
    # One GEMM per projection forward, one per dgrad but for layer 0's q/k/v, whose input (the
    # frozen embedding, normed by a frozen norm) needs no gradient; g and dB for every projection.
    assert seen == {"gemm_lowrank": 2 * projections - 3, "lowrank_grads": projections}
    close(got_logits, want_logits, "logits")
    assert got.keys() == want.keys() and len(got) == 2 * projections
    for name in want:
        scale = max(want[name].abs().max().item(), 1e-3)
        err = (got[name] - want[name]).abs().max().item()
        assert err <= 2e-2 * scale, f"{name}: {err} vs {scale}"


def test_the_kernels_leave_fp32_deterministic_and_never_to_cublas(monkeypatch):
    seen = calls(monkeypatch)
    fp32 = llama()
    inject_lora(fp32, r=4, init="gaussian")
    fp32(torch.randint(0, 100, (2, 5))).logits.sum().backward()
    assert seen == {"gemm_lowrank": 0, "lowrank_grads": 0}  # fp32: cuBLAS, no TF32 rounding
    torch.use_deterministic_algorithms(True)  # the fixture restores the suite's setting
    llama_step()
    torch.use_deterministic_algorithms(False)
    assert seen["lowrank_grads"] == 0 and seen["gemm_lowrank"] > 0  # atomics are not reproducible
    with kernels.triton_kernels("never"):
        before = dict(seen)
        llama_step()
    assert seen == before
    with kernels.triton_kernels("auto"):  # auto times kernels on CUDA only
        llama_step()
    assert seen == before
    with fast_path("never"):  # the reference path never reaches them
        llama_step()
    assert seen == before


def adapted_linear(d_in=40, d_out=50, r=4, bias=True, **fields):
    """One fp16 nn.Linear with LoRA, B trained-sized so the update matters."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=bias))
    inject_lora(model, r=r, alpha=2 * r, init="gaussian", **fields)
    model.to(HALF)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def grads_of(model, x, seed=3):
    torch.manual_seed(seed)  # the same dropout mask on both paths
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.float().pow(2).sum().backward()
    out = [y.detach().float(), x.grad.float()]
    out += [p.grad.float() for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("fields", [{}, {"dropout": 0.3}, {"freeze_a": True}], ids=["bias", "dropout", "lora-fa"])
def test_the_function_with_bias_dropout_or_frozen_a_matches_cublas_through_the_kernels(monkeypatch, fields):
    model = adapted_linear(**fields).train()
    x = rand(3, 23, 40, seed=9)
    with kernels.triton_kernels("never"):
        want = grads_of(model, x)
    seen = calls(monkeypatch)
    got = grads_of(model, x)
    assert seen["gemm_lowrank"] >= 1
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        close(g, w, str(fields))


def test_an_empty_batch_and_a_rank_above_the_tiles_take_cublas(monkeypatch):
    seen = calls(monkeypatch)
    model = adapted_linear()
    empty = torch.zeros(0, 40, dtype=HALF, requires_grad=True)
    model(empty).sum().backward()  # the cuBLAS path handles M = 0; the kernels' grid would not
    assert empty.grad.shape == (0, 40)
    adapted_linear(d_in=300, d_out=260, r=kernels.MAX_RANK + 1)(rand(5, 300)).sum().backward()
    assert seen == {"gemm_lowrank": 0, "lowrank_grads": 0}


def test_a_strided_bias_is_read_right():
    x, W, a, B = rand(20, 24, seed=1), rand(16, 24, scale=0.2, seed=2), rand(20, 4, seed=3), rand(16, 4, seed=4)
    bias = rand(32, seed=5)[::2]  # stride 2
    y = kernels.gemm_lowrank(x, W.t(), a, B.t(), bias, 2.0)
    close(y, x.float() @ W.float().t() + 2.0 * a.float() @ B.float().t() + bias.float(), "strided bias")


def test_kernel_mode_is_validated_and_restored():
    with pytest.raises(ValueError, match="triton kernel mode must be one of"):
        kernels.set_triton_kernels("fast")
    with kernels.triton_kernels("never"):
        assert kernels.triton_kernel_mode() == "never"
    assert kernels.triton_kernel_mode() == "always"


def test_kernels_are_registered_as_custom_ops_for_torch_compile():
    # Registration and calling convention only (the numbers are the tests above): opcheck's
    # fake-tensor test needs real Triton kernels (the interpreter runs them on fake tensors);
    # experiments/benchmark/kernel_check.py runs torch.library.opcheck on both ops on a GPU.
    x, W, a, B = rand(20, 24, seed=1), rand(16, 24, seed=2), rand(20, 4, seed=3), rand(16, 4, seed=4)
    dy = rand(20, 16, seed=5)
    y = torch.ops.lightning_lora.gemm_lowrank(x, W.t(), a, B.t(), None, 2.0, [4, 5])
    assert y.shape == (4, 5, 16)
    torch.testing.assert_close(y.view(20, 16), kernels.gemm_lowrank(x, W.t(), a, B.t(), None, 2.0))
    for got, want in zip(
        torch.ops.lightning_lora.lowrank_grads(dy, B, a, 2.0), kernels.lowrank_grads(dy, B, a, 2.0), strict=True
    ):
        torch.testing.assert_close(got, want)
