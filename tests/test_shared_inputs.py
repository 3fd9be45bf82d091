"""Sibling layers that read one input share x Aᵀ: the same outputs and gradients as computing
it per layer, on a real Llama, and never a stale or foreign result."""

import pytest
import torch
from torch import nn

from lightning_lora import inject_lora
from lightning_lora.shared_inputs import SharedProjection, input_sharing, sharing_inputs

from .hf_models import as_if_trained, ids, llama


@pytest.fixture(autouse=True)
def sharing_on():
    """Sharing is off by default: these tests turn it on, and restore the default after."""
    assert not input_sharing()
    with sharing_inputs(True):
        yield


@pytest.fixture
def shared_gemms(monkeypatch):
    """Counts SharedProjection calls (one per group and forward when sharing happens)."""
    calls = []
    forward = SharedProjection.forward

    def counted(ctx, x, *As):
        calls.append(len(As))
        return forward(ctx, x, *As)

    monkeypatch.setattr(SharedProjection, "forward", staticmethod(counted))
    return calls


def trained_llama(**fields):
    model = llama()
    inject_lora(model, r=4, **fields)
    as_if_trained(model)
    return model.train()


def step(model, tokens):
    """Logits and every gradient (adapters and the input embeddings) of one backward."""
    model.zero_grad(set_to_none=True)
    model.get_input_embeddings().weight.requires_grad_(True)
    logits = model(input_ids=tokens).logits
    logits.pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("fields", [{}, {"freeze_a": True}], ids=["lora", "lora-fa"])
def test_a_llama_gives_the_same_outputs_and_gradients_with_and_without_sharing(fields, shared_gemms):
    tokens = ids()
    results = {}
    for sharing in (False, True):
        with sharing_inputs(sharing):
            results[sharing] = step(trained_llama(**fields), tokens)
    # per decoder layer: q, k, v, o share one group (o reads another tensor), gate and up another
    assert shared_gemms == [4, 2] * 2
    (y0, g0), (y1, g1) = results[False], results[True]
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys() and any(".lora_B." in k for k in g0)
    assert any(".lora_A." in k for k in g0) != bool(fields)  # A frozen under LoRA-FA: no gradient
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_recomputes_the_shared_projection(shared_gemms):
    tokens = ids()
    plain, checkpointed = trained_llama(), trained_llama()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    (y0, g0), (y1, g1) = step(plain, tokens), step(checkpointed, tokens)
    assert shared_gemms == [4, 2] * 2 * 3  # plain, checkpointed, and its recomputation in backward
    torch.testing.assert_close(y1, y0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def attention(model):
    return model.model.layers[0].self_attn


def per_layer(layer, x):
    """The layer's output computed alone (sharing off)."""
    with sharing_inputs(False):
        return layer(x)


def test_a_sibling_not_called_gets_no_gradient_and_the_others_exact_ones(shared_gemms):
    attn = attention(trained_llama())
    x = torch.randn(2, 5, 32, requires_grad=True)
    q, v = attn.q_proj(x), attn.v_proj(x)  # k is skipped, as by a branch not taken
    assert shared_gemms == [4]
    (q.sum() + v.pow(2).sum()).backward()
    assert attn.k_proj.lora_A["default"].grad is None and attn.o_proj.lora_A["default"].grad is None
    shared = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
    shared_dx = x.grad.clone()
    attn.zero_grad(set_to_none=True)
    x.grad = None
    (per_layer(attn.q_proj, x).sum() + per_layer(attn.v_proj, x).pow(2).sum()).backward()
    alone = {n: p.grad for n, p in attn.named_parameters() if p.grad is not None}
    assert shared.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(shared[name], alone[name], msg=name)
    torch.testing.assert_close(shared_dx, x.grad)


def test_an_input_changed_in_place_between_siblings_is_not_served_the_old_projection(shared_gemms):
    attn = attention(trained_llama())
    x = torch.randn(2, 5, 32)
    attn.q_proj(x)
    x.mul_(3)  # k must see the new values
    assert shared_gemms == [4]
    torch.testing.assert_close(attn.k_proj(x), per_layer(attn.k_proj, x))


def test_an_adapter_changed_between_siblings_is_not_served_the_old_projection(shared_gemms):
    attn = attention(trained_llama())
    x = torch.randn(2, 5, 32)
    attn.q_proj(x)
    with torch.no_grad():
        attn.k_proj.lora_A["default"].add_(1.0)  # an optimizer step, say
    torch.testing.assert_close(attn.k_proj(x), per_layer(attn.k_proj, x))


def test_each_result_is_taken_once_and_a_repeated_call_trains_correctly(shared_gemms):
    attn = attention(trained_llama())
    x = torch.randn(2, 5, 32, requires_grad=True)
    outs = [attn.q_proj(x), attn.k_proj(x), attn.k_proj(x)]  # k twice on one input
    assert shared_gemms == [4]
    sum(o.sum() for o in outs).backward()
    shared = attn.k_proj.lora_A["default"].grad.clone()
    attn.zero_grad(set_to_none=True)
    sum(per_layer(layer, x).sum() for layer in (attn.q_proj, attn.k_proj, attn.k_proj)).backward()
    torch.testing.assert_close(shared, attn.k_proj.lora_A["default"].grad)
    # after that backward freed the graph, the same input again (no optimizer step): new results,
    # for the siblings called before it (k, q) and for the one never called (v)
    for layer in (attn.k_proj, attn.q_proj, attn.v_proj):
        layer(x).sum().backward()


def test_another_input_another_grad_mode_or_a_later_leader_computes_alone(shared_gemms):
    attn = attention(trained_llama())
    x, other = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    attn.q_proj(x)
    torch.testing.assert_close(attn.k_proj(other), per_layer(attn.k_proj, other))
    with torch.no_grad():
        attn.q_proj(x)
    y = attn.k_proj(x)  # the entry was made without gradients
    assert y.requires_grad
    attn.k_proj(torch.randn(2, 5, 32))  # k is not the group's first member: it never leads
    assert shared_gemms == [4, 4]
    with torch.inference_mode():
        attn.q_proj(x)
    assert shared_gemms == [4, 4]


def test_nothing_is_shared_with_the_reference_path_or_with_sharing_off(shared_gemms):
    from lightning_lora.fused import fast_path

    attn = attention(trained_llama())
    with fast_path("never"):
        attn.q_proj(torch.randn(2, 5, 32))
    with sharing_inputs(False):
        attn.q_proj(torch.randn(2, 5, 32))
    assert shared_gemms == []
    assert isinstance(attn.q_proj.base_layer, nn.Linear)


def test_with_freeze_a_the_shared_projection_keeps_no_input(shared_gemms):
    from .test_lora_fa import kept_inputs

    tokens = ids()
    names = [n for n, m in llama().named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    kept = {}
    for freeze_a in (False, True):
        model = llama()
        inject_lora(model, r=4, freeze_a=freeze_a, exclude_modules=["lm_head"])
        kept[freeze_a] = kept_inputs(model, names, tokens)
    assert shared_gemms  # the shared GEMM ran
    assert kept[False] == sorted(names)
    assert all(".self_attn.o_proj" in n for n in kept[True])  # SDPA's output, kept by the frozen model too
