"""Mixed-adapter batches: ``with per_sample_adapters(model, names): model(x)`` runs row i through
adapter ``names[i]`` only, as PEFT's ``model(x, adapter_names=names)``; refusals and clean exits."""

import lightning as L
import pytest
import torch
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader

from lightning_lora import (
    LoRAStateError,
    active_adapters,
    adapted_weights,
    disable_adapters,
    inject_lora,
    merge_lora,
    per_sample_adapters,
    save_adapter,
    set_adapter,
)
from lightning_lora.fused import fast_path
from lightning_lora.layers import LoRAWrapper

from .hf_models import as_if_trained, gpt2, ids, llama

NAMES = ["a", "__base__", "b", "c", "a", "b"]
"""Three adapters and the base, repeated and out of order: six rows, four sub-batches."""


def untied_llama():
    return llama(tied=False)


BUILDS = {"llama": untied_llama, "gpt2": gpt2}
TARGETS = {  # "c" adapts one module kind only: other layers lack it and add nothing to its rows
    "llama": (["q_proj", "v_proj", "down_proj", "embed_tokens"], ["o_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["c_fc"]),
}


def three_adapters(kind: str) -> nn.Module:
    """A tiny real model with adapters a (r=4), b (r=2, rsLoRA) and c (r=8, other modules), all
    with non-zero B, so every row's adapter changes its output."""
    model = BUILDS[kind]()
    shared, other = TARGETS[kind]
    inject_lora(model, adapter_name="a", r=4, alpha=8, target_modules=shared)
    inject_lora(model, adapter_name="b", r=2, alpha=4, use_rslora=True, target_modules=shared)
    inject_lora(model, adapter_name="c", r=8, alpha=8, target_modules=other)
    as_if_trained(model)
    return model.eval()


def logits_alone(model: nn.Module, tokens: torch.Tensor, name: str) -> torch.Tensor:
    """``tokens`` (one row) with only adapter ``name`` active, the ordinary way."""
    with torch.no_grad():
        if name == "__base__":
            with disable_adapters(model):
                return model(input_ids=tokens).logits
        set_adapter(model, name)
        return model(input_ids=tokens).logits


def mixed_logits(model: nn.Module, tokens: torch.Tensor, names: list[str]) -> torch.Tensor:
    with torch.no_grad(), per_sample_adapters(model, names):
        return model(input_ids=tokens).logits


# ------------------------------------------------------------------------- what a row computes


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["auto", "never"], ids=["fast-path", "reference-path"])
def test_each_row_equals_its_sample_run_alone_with_only_its_adapter_active(kind, mode):
    model = three_adapters(kind)
    tokens = ids(len(NAMES))
    with fast_path(mode):
        mixed = mixed_logits(model, tokens, NAMES)
        for i, name in enumerate(NAMES):
            alone = logits_alone(model, tokens[i : i + 1], name)
            torch.testing.assert_close(mixed[i], alone[0], rtol=0, atol=1e-6)
    rows = {name: mixed[[i for i, n in enumerate(NAMES) if n == name]][0] for name in dict.fromkeys(NAMES)}
    assert all((rows[n] - rows["__base__"]).abs().max() > 1e-3 for n in "abc")  # each adapter matters


@pytest.mark.parametrize("name", ["a", "c", "__base__"])
def test_a_batch_of_one_name_is_that_adapters_plain_forward_bit_for_bit(name):
    model = three_adapters("llama")
    tokens = ids(3)
    expected = logits_alone(model, tokens, name)
    assert torch.equal(mixed_logits(model, tokens, [name] * 3), expected)


def test_each_sub_batch_runs_once_not_each_row():
    model = three_adapters("llama")
    q_proj = model.model.layers[0].self_attn.q_proj.base_layer
    calls = []
    q_proj.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    mixed_logits(model, ids(len(NAMES)), NAMES)
    assert sorted(calls) == [1, 1, 2, 2]  # __base__, c, a a, b b: four sub-batches of six rows


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_batches_equal_peft_adapter_names_with_the_same_adapters(kind, tmp_path):
    ours = three_adapters(kind)
    for name in "abc":
        save_adapter(ours, tmp_path / name, adapter_name=name)
    theirs = PeftModel.from_pretrained(BUILDS[kind](), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.load_adapter(tmp_path / "c", adapter_name="c")
    theirs.eval()
    tokens = ids(len(NAMES))
    with torch.no_grad():
        expected = theirs(input_ids=tokens, adapter_names=NAMES).logits
    torch.testing.assert_close(mixed_logits(ours, tokens, NAMES), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["auto", "never"], ids=["fast-path", "reference-path"])
def test_dora_rows_equal_their_sample_run_alone_where_peft_refuses_dora(kind, mode):
    """DoRA's scale ``m / ‖W + ΔW‖`` depends on the weights only, so rows stay independent and
    each sub-batch's own forward is exact (PEFT's ``adapter_names`` refuses DoRA)."""
    model = BUILDS[kind]()
    targets = TARGETS[kind][0][:2]  # Linear / Conv1D layers: DoRA's types
    inject_lora(model, adapter_name="dora", r=4, use_dora=True, target_modules=targets)
    inject_lora(model, adapter_name="plain", r=4, target_modules=targets)
    as_if_trained(model)
    model.eval()
    names = ["dora", "plain", "__base__", "dora"]
    tokens = ids(len(names))
    with fast_path(mode):
        mixed = mixed_logits(model, tokens, names)
        alone = torch.cat([logits_alone(model, tokens[i : i + 1], n) for i, n in enumerate(names)])
    torch.testing.assert_close(mixed, alone, rtol=0, atol=1e-6)
    assert (alone[0] - alone[2]).abs().max() > 1e-3  # DoRA changes its rows


class EmbedConvNet(nn.Module):
    """Token ids → ``nn.Embedding`` → ``nn.Conv1d`` over the sequence → ``nn.Linear``: the wrapper
    types beyond Linear and Conv1D, each seeing the batch in dim 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16, padding_idx=0)
        self.conv = nn.Conv1d(16, 16, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(tokens).transpose(1, 2)).transpose(1, 2)  # (N, T, 16)
        return self.head(h)


def test_embedding_conv_and_linear_layers_mix_per_sample_too():
    model = EmbedConvNet()
    for name, r in [("a", 4), ("b", 2)]:
        inject_lora(model, adapter_name=name, r=r, target_modules=["embed", "conv", "head"])
    as_if_trained(model)
    model.eval()
    tokens = torch.randint(0, 50, (5, 7), generator=torch.Generator().manual_seed(0))
    names = ["b", "a", "__base__", "a", "b"]
    with torch.no_grad():
        with per_sample_adapters(model, names):
            mixed = model(tokens)
        for i, name in enumerate(names):
            if name == "__base__":
                with disable_adapters(model):
                    alone = model(tokens[i : i + 1])
            else:
                set_adapter(model, name)
                alone = model(tokens[i : i + 1])
            torch.testing.assert_close(mixed[i], alone[0], rtol=0, atol=1e-6)


def test_hooks_on_an_adapted_layer_see_the_whole_batch_once():
    model = three_adapters("llama")
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    mixed_logits(model, ids(len(NAMES)), NAMES)
    assert seen == [len(NAMES)]


def test_two_models_each_inside_its_own_block_route_their_own_rows():
    first, second = three_adapters("llama"), three_adapters("gpt2")
    tokens = ids(2)
    with torch.no_grad():
        expected = logits_alone(first, tokens[:1], "a")[0], logits_alone(second, tokens[1:], "b")[0]
        with per_sample_adapters(first, ["a", "c"]), per_sample_adapters(second, ["c", "b"]):
            got = first(input_ids=tokens).logits[0], second(input_ids=tokens).logits[1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------- Lightning


class Generator(L.LightningModule):
    """A LightningModule whose batches carry, per row, the adapter (task) they belong to."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch: tuple[torch.Tensor, list[str]]) -> torch.Tensor:
        tokens, names = batch
        with per_sample_adapters(self.model, names):
            return self.model(input_ids=tokens).logits


def test_predict_step_serves_every_adapter_in_one_batch_through_trainer_predict(tmp_path):
    model = three_adapters("llama")
    tokens = ids(len(NAMES))
    data = DataLoader(list(zip(tokens, NAMES, strict=True)), batch_size=4)  # batches of mixed names
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    predictions = torch.cat(trainer.predict(Generator(model), data))
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(predictions[i], logits_alone(model, tokens[i : i + 1], name)[0], rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------- refusals


def refused(model: nn.Module, names, match: str, tokens: torch.Tensor | None = None) -> None:
    """``per_sample_adapters`` refuses with a message matching ``match``, and leaves no trace."""
    active = active_adapters(model)
    with pytest.raises(LoRAStateError, match=match), torch.no_grad(), per_sample_adapters(model, names):
        model(input_ids=ids(len(names)) if tokens is None else tokens)
    left_clean(model, active)


def left_clean(model: nn.Module, active: list[str]) -> None:
    """Nothing of a block is left on the model: no routing attribute, no hook, same adapters."""
    wrappers = [m for m in model.modules() if isinstance(m, LoRAWrapper)]
    assert wrappers and all("per_sample" not in m.__dict__ and m.per_sample is None for m in wrappers)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert active_adapters(model) == active


def test_training_mode_is_refused_as_peft_refuses_it():
    model = three_adapters("llama").train()
    refused(model, ["a", "b"], r"for inference, and the model is in training mode.*model\.eval\(\)")


def test_training_mode_switched_on_inside_the_block_is_refused_at_the_first_layer():
    model = three_adapters("llama")
    training = r"'model\.embed_tokens' is in training mode"
    with pytest.raises(LoRAStateError, match=training), per_sample_adapters(model, ["a", "b"]):
        model.train()
        model(input_ids=ids(2))
    left_clean(model, ["c"])


def test_merged_adapters_are_refused_naming_them():
    model = three_adapters("llama")
    set_adapter(model, "a")
    merge_lora(model)
    refused(model, ["a", "b"], r"adapters \['a'\] are merged into the weight of .*unmerge_lora\(model\)")


def test_names_the_model_lacks_are_refused_listing_the_ones_it_has():
    model = three_adapters("llama")
    refused(model, ["a", "typo", "__base__"], r"no adapter named \['typo'\].*adapters: \['a', 'b', 'c'\].*'__base__'")


def test_a_wrong_number_of_names_is_refused_at_the_first_layer_naming_both_sizes():
    model = three_adapters("llama")
    refused(
        model,
        ["a", "b", "c"],
        r"has 3 names, one per row of the batch, but 'model\.embed_tokens' was called with an input of leading "
        r"size 4 \(shape \(4, 12\)\)",
        tokens=ids(4),
    )


def test_a_layer_fed_one_row_broadcast_over_the_batch_is_refused_naming_it():
    model = gpt2()  # its position embedding sees position ids (1, T), added to every row
    inject_lora(model, adapter_name="a", r=4, target_modules=["wpe"])
    model.eval()
    refused(model, ["a", "__base__"], r"'transformer\.wpe' was called with an input of leading size 1")


def test_a_layer_fed_flattened_tokens_is_refused_naming_it():
    class Flattening(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = nn.functional.one_hot(input_ids % 8, 8).float()  # (N, T, 8)
            return self.proj(x.reshape(-1, 8))  # (N·T, 8): rows are tokens, not samples

    model = Flattening()
    inject_lora(model, adapter_name="a", r=2, target_modules=["proj"])
    model.eval()
    refused(model, ["a", "a"], r"'proj' was called with an input of leading size 24.*flattens tokens to \(N·T, d\)")


def test_an_adapter_on_multihead_attention_weights_is_refused_before_anything_runs():
    model = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    inject_lora(model, adapter_name="a", r=2, target_modules=["self_attn", "linear1"])
    model.eval()
    ran = []
    model.register_forward_pre_hook(lambda module, args: ran.append(True))
    on_weights = r"'self_attn\.in_proj_weight\[q\]' \(4 more\): .*parametrization"
    with pytest.raises(LoRAStateError, match=on_weights), per_sample_adapters(model, ["a", "__base__"]):
        model(torch.randn(2, 3, 16))
    assert not ran
    assert all("per_sample" not in m.__dict__ for m in model.modules())


def test_disabled_adapters_are_refused_rather_than_ignored():
    model = three_adapters("llama")
    with disable_adapters(model):
        refused(model, ["a", "b"], r"adapters are disabled in .*disable_adapters.*'__base__'")


def test_blocks_on_one_model_do_not_nest_and_the_refusal_leaves_the_outer_block_working():
    model = three_adapters("llama")
    tokens = ids(2)
    expected = torch.cat([logits_alone(model, tokens[:1], "a"), logits_alone(model, tokens[1:], "b")])
    with torch.no_grad(), per_sample_adapters(model, ["a", "b"]):
        with (
            pytest.raises(LoRAStateError, match="already inside a per_sample_adapters block"),
            per_sample_adapters(model, ["b", "a"]),
        ):
            pass
        torch.testing.assert_close(model(input_ids=tokens).logits, expected, rtol=0, atol=1e-6)
    left_clean(model, ["b"])


def test_a_model_without_adapters_is_refused():
    no_lora = r"cannot run adapters per sample: the model has no LoRA layers"
    with pytest.raises(LoRAStateError, match=no_lora), per_sample_adapters(llama(), ["__base__"]):
        pass


@pytest.mark.parametrize("names", ["a", None, ["a", 3]])
def test_names_must_be_a_list_of_strings(names):
    model = three_adapters("llama")
    with (
        pytest.raises(LoRAStateError, match=r"one adapter name per row|adapter names are strings"),
        per_sample_adapters(model, names),
    ):
        pass


# ---------------------------------------------------------------------------- clean exits


def test_the_model_is_as_before_after_an_exception_inside_the_block():
    model = three_adapters("llama")
    set_adapter(model, ["a", "b"])
    tokens = ids(2)
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    with pytest.raises(KeyError), per_sample_adapters(model, ["a", "c"]):
        raise KeyError("the user's own error")
    left_clean(model, ["a", "b"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, before)


def test_an_error_raised_inside_a_layer_mid_batch_leaves_every_layer_as_before():
    model = three_adapters("llama")
    down = model.model.layers[1].mlp.down_proj.base_layer
    calls = []

    def fail_on_second_sub_batch(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory, say")

    handle = down.register_forward_pre_hook(fail_on_second_sub_batch)
    with pytest.raises(RuntimeError, match="out of memory"), torch.no_grad(), per_sample_adapters(model, ["a", "b"]):
        model(input_ids=ids(2))
    handle.remove()
    left_clean(model, ["c"])
    assert [m.active_adapters for m in model.modules() if isinstance(m, LoRAWrapper)] == [
        ["c"] if "c" in t.layer.lora_A else [] for t in adapted_weights(model)
    ]
