"""Adapter files: PEFT reads ours and we read PEFT's (real peft, real all-MiniLM-L6-v2), our own
round trip for nn.MultiheadAttention adapters, atomic writes, and every refusal of a bad file."""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_lora.io as lora_io
from lightning_lora import (
    AdapterFileError,
    LoRAStateError,
    adapter_names,
    inject_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    read_adapter,
    save_adapter,
    set_adapter,
    unload_lora,
)
from lightning_lora.task import load_minilm

QKV = ["query", "key", "value"]


@pytest.fixture(scope="module")
def minilm():
    """The pretrained encoder, loaded once; tests work on deep copies."""
    return load_minilm().eval()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def randomize(model, std=0.05):
    """Non-zero A and B of the size training gives: with B = 0 every adapter would look right.
    Works on PEFT models too (their ``lora_A``/``lora_B`` parameters)."""
    g = torch.Generator().manual_seed(1)
    params = lora_parameters(model) or [p for n, p in model.named_parameters() if ".lora_" in n]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


class Classifier(nn.Module):
    """MiniLM and a new head: the default job's shape, without Lightning."""

    def __init__(self, encoder, seed=0):
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)
        self.head = nn.Linear(384, 5)

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(states[:, 0])


def hidden(model, tokens):
    with torch.no_grad():
        return model(**tokens).last_hidden_state


# ------------------------------------------------------------------------------ PEFT interop


def test_peft_loads_our_adapter_with_no_missing_or_unexpected_keys_and_the_same_outputs(minilm, tokens, tmp_path):
    ours = copy.deepcopy(minilm)
    inject_lora(ours, r=4, alpha=8, target_modules=QKV)
    randomize(ours)
    save_adapter(ours, tmp_path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = PeftModel.from_pretrained(copy.deepcopy(minilm), tmp_path).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    torch.testing.assert_close(hidden(theirs, tokens), hidden(ours, tokens), rtol=0, atol=1e-5)
    assert (hidden(ours, tokens) - hidden(minilm, tokens)).abs().max() > 1e-2  # the adapter matters

    again = theirs.load_adapter(tmp_path, adapter_name="again")
    assert again.missing_keys == [] and again.unexpected_keys == []
    peft_state = theirs.state_dict()
    for name, module in ours.named_modules():
        if name.endswith(tuple(QKV)):
            assert torch.equal(peft_state[f"base_model.model.{name}.lora_A.default.weight"], module.lora_A["default"])
            assert torch.equal(peft_state[f"base_model.model.{name}.lora_B.default.weight"], module.lora_B["default"])


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8},
        {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"layer.1.attention.self.key": 2}},
        {"r": 2, "lora_alpha": 16, "alpha_pattern": {"value": 4}},
    ],
    ids=["plain", "rslora+rank_pattern", "alpha_pattern"],
)
def test_we_load_a_peft_adapter_and_give_peft_outputs(config, minilm, tokens, tmp_path):
    theirs = get_peft_model(copy.deepcopy(minilm), LoraConfig(target_modules=QKV, **config)).eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(minilm)
    names = load_adapter(ours, tmp_path)
    assert len(names) == 6 * 3
    torch.testing.assert_close(hidden(ours, tokens), hidden(theirs, tokens), rtol=0, atol=1e-5)
    if "rank_pattern" in config:
        assert ours.encoder.layer[1].attention.self.key.r["default"] == 2


def test_trainable_head_travels_both_ways_as_modules_to_save(minilm, tokens, tmp_path):
    ours = Classifier(copy.deepcopy(minilm), seed=0)
    inject_lora(ours, r=4, target_modules=QKV, trainable_modules=["head"])
    randomize(ours)
    with torch.no_grad():
        ours.head.weight.mul_(3)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == ["head"]
    theirs = PeftModel.from_pretrained(Classifier(copy.deepcopy(minilm), seed=1), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(**tokens), ours(**tokens), rtol=0, atol=1e-5)

    theirs = get_peft_model(
        Classifier(copy.deepcopy(minilm), seed=2),
        LoraConfig(r=4, lora_alpha=8, target_modules=QKV, modules_to_save=["head"]),
    ).eval()
    randomize(theirs)
    with torch.no_grad():
        theirs.base_model.model.head.modules_to_save["default"].weight.mul_(-2)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = Classifier(copy.deepcopy(minilm), seed=3)
    load_adapter(ours, tmp_path / "theirs")
    torch.testing.assert_close(ours(**tokens), theirs(**tokens), rtol=0, atol=1e-5)
    assert ours.head.weight.requires_grad and not ours.encoder.embeddings.word_embeddings.weight.requires_grad


def test_merged_and_unloaded_state_dict_loads_strictly_into_a_model_that_never_saw_lora(minilm, tokens):
    model = copy.deepcopy(minilm)
    inject_lora(model, r=8, target_modules="all-linear")
    randomize(model)
    adapted = hidden(model, tokens)
    unload_lora(model, merge=True)
    fresh = load_minilm().eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(hidden(fresh, tokens), adapted, rtol=0, atol=1e-5)


# --------------------------------------------------------------------- our own format, MHA


def seq2seq():
    torch.manual_seed(0)
    return nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True).eval()


def test_multihead_attention_adapters_round_trip_through_our_files(tmp_path):
    model = seq2seq()
    inject_lora(model, r=2, target_modules=["self_attn", "multihead_attn"], mha_projections=["q", "v"], init="gaussian")
    randomize(model)
    save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")  # PEFT's MHA layout (see test_peft_mha.py)
    assert keys["base_model.model.encoder.layers.0.self_attn.lora_A.weight"].shape == (4, 32)  # q and v: rank 2 + 2
    assert keys["base_model.model.encoder.layers.0.self_attn.lora_B.weight"].shape == (96, 4)
    assert "base_model.model.decoder.layers.0.multihead_attn.base_layer.out_proj.lora_B.weight" in keys
    assert not any("[" in k for k in keys)

    fresh = seq2seq()
    load_adapter(fresh, tmp_path)
    src, tgt = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        assert torch.equal(fresh(src, tgt), model(src, tgt))
        assert not torch.equal(fresh(src, tgt), seq2seq()(src, tgt))


# ----------------------------------------------------------------------------- atomic writes


class Net(nn.Module):
    def __init__(self, d=16, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"query": nn.Linear(d, d), "value": nn.Linear(d, d)}) for _ in range(layers)
        )
        self.head = nn.Linear(d, 3)


def adapter_dir(tmp_path, model=None, **config) -> Path:
    model = model or Net()
    config.setdefault("target_modules", ["query", "value"])
    inject_lora(model, r=4, **config)
    randomize(model)
    return save_adapter(model, tmp_path / "adapter")


def test_a_crash_while_saving_leaves_the_previous_adapter_whole_and_no_temporary_file(tmp_path, monkeypatch):
    directory = adapter_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def write_half_then_fail(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    newer = Net()
    inject_lora(newer, r=4, target_modules=["query", "value"], init="gaussian")
    monkeypatch.setattr(lora_io, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(newer, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    load_adapter(Net(), directory)  # still a whole, loadable adapter


def test_adapter_files_get_the_permissions_of_any_new_file(tmp_path):
    directory = adapter_dir(tmp_path)
    (tmp_path / "plain").write_text("x")
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()} == {
        "adapter_config.json": expected,
        "adapter_model.safetensors": expected,  # safetensors alone would make it 0600
    }


# --------------------------------------------------------------------------- refusing files


def edit_config(directory: Path, **changes) -> None:
    file = directory / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def test_adapter_for_another_base_names_the_weight_and_both_shapes(tmp_path):
    directory = adapter_dir(tmp_path, Net(d=16))
    with pytest.raises(AdapterFileError) as err:
        load_adapter(Net(d=8), directory)
    assert str(err.value) == (
        f"adapter {str(directory)!r} does not fit 'layers.0.query': the file has lora_A (4, 16) and "
        f"lora_B (16, 4), this model's 8×8 weight needs (4, 8) and (8, 4). Was it trained on another base model?"
    )


def test_a_failed_load_leaves_the_model_exactly_as_it_was(tmp_path):
    directory = adapter_dir(tmp_path, Net(d=16))
    model = Net(d=8)
    inject_lora(model, r=2, target_modules=["query"], adapter_name="mine")
    keys, flags = list(model.state_dict()), {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(AdapterFileError):
        load_adapter(model, directory, adapter_name="theirs")
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert adapter_names(model) == ["mine"] and model.layers[0].query.active_adapters == ["mine"]
    bare = Net(d=8)
    with pytest.raises(AdapterFileError):
        load_adapter(bare, directory)
    assert [type(m) for m in bare.modules()] == [type(m) for m in Net(d=8).modules()]


def test_a_module_the_model_lacks_is_named(tmp_path):
    directory = adapter_dir(tmp_path, Net(layers=2))
    with pytest.raises(
        AdapterFileError, match=r"does not fit this model: no module named 'layers\.1\.query' in this Net"
    ):
        load_adapter(Net(layers=1), directory)


def test_names_that_differ_by_a_prefix_load_and_say_so(tmp_path):
    # More in test_adapter_roots.py: the file of a wrapper loads into the model it wraps.
    directory = adapter_dir(tmp_path, nn.ModuleDict({"encoder": Net()}))
    with pytest.warns(UserWarning, match=r"its names fit this Net without the prefix 'encoder\.'"):
        assert load_adapter(Net(), directory)[0] == "layers.0.query"


def test_rank_in_config_that_disagrees_with_the_tensors_is_refused(tmp_path):
    directory = adapter_dir(tmp_path)
    edit_config(directory, r=8)
    with pytest.raises(
        AdapterFileError, match=r"says r=8 but .* was saved with r=4: the two files come from different saves"
    ):
        read_adapter(directory)
    # a PEFT file has no metadata to compare with: the shapes still tell
    tensors = load_file(directory / "adapter_model.safetensors")
    save_file(tensors, directory / "adapter_model.safetensors")
    with pytest.raises(
        AdapterFileError, match=r"says r=8 for 'layers\.0\.query', but .* has lora_A \(4, 16\) and lora_B \(16, 4\)"
    ):
        read_adapter(directory)


def test_missing_or_corrupt_config_is_refused(tmp_path):
    with pytest.raises(
        AdapterFileError, match=r"'.*nowhere' does not exist; an adapter directory holds adapter_config\.json"
    ):
        load_adapter(Net(), tmp_path / "nowhere")
    directory = adapter_dir(tmp_path)
    text = (directory / "adapter_config.json").read_text()
    (directory / "adapter_config.json").write_text(text[: len(text) // 2])
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json is not valid JSON \(.*\); the file is corrupt"):
        load_adapter(Net(), directory)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match=r"has no adapter_config\.json"):
        load_adapter(Net(), directory)


def test_unknown_fields_at_their_defaults_are_ignored_with_a_warning(tmp_path):
    directory = adapter_dir(tmp_path)
    edit_config(directory, use_future_trick=False, future_config=None)
    with pytest.warns(
        UserWarning, match=r"ignoring unknown fields left at their defaults: \['future_config', 'use_future_trick'\]"
    ):
        load_adapter(Net(), directory)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"lora_bias": True},
            r"sets lora_bias=True: a trained bias on lora_B, which lightning-lora does not implement",
        ),
        (
            {"use_future_trick": True},
            r"sets fields lightning-lora does not know \(use_future_trick=True\), probably from a newer PEFT",
        ),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa', which also changes the base weights"),
        ({"peft_type": "IA3"}, r"describes a peft_type='IA3' adapter; lightning-lora loads LORA adapters only"),
    ],
)
def test_fields_that_change_the_math_are_refused(changes, message, tmp_path):
    directory = adapter_dir(tmp_path)
    edit_config(directory, **changes)
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(Net(), directory)


def test_a_truncated_safetensors_file_is_refused(tmp_path):
    directory = adapter_dir(tmp_path)
    file = directory / "adapter_model.safetensors"
    data = file.read_bytes()
    for size in (len(data) - 100, 5):
        file.write_bytes(data[:size])
        with pytest.raises(AdapterFileError, match=r"is not a readable safetensors file \(.*\); it may be truncated"):
            load_adapter(Net(), directory)


def test_lora_variants_we_do_not_implement_are_refused_by_tensor_name(tmp_path):
    directory = adapter_dir(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors["base_model.model.layers.0.query.lora_B.bias"] = torch.ones(16)  # PEFT's lora_bias
    save_file(tensors, directory / "adapter_model.safetensors")
    with pytest.raises(
        AdapterFileError,
        match=r"holds 'base_model\.model\.layers\.0\.query\.lora_B\.bias', a LoRA tensor of a kind",
    ):
        load_adapter(Net(), directory)


def test_loading_under_a_name_already_taken_is_refused(tmp_path):
    directory = adapter_dir(tmp_path)
    model = Net()
    load_adapter(model, directory)
    with pytest.raises(
        LoRAStateError, match=r"already has an adapter named 'default'; load this one under another name"
    ):
        load_adapter(model, directory)
    with pytest.raises(
        LoRAStateError, match=r"adapter_name='copy' cannot be used: it is an attribute of nn\.ParameterDict"
    ):
        load_adapter(model, directory, adapter_name="copy")
    load_adapter(model, directory, adapter_name="second")
    set_adapter(model, "default")
    assert adapter_names(model) == ["default", "second"]


def test_a_poisoned_adapter_file_loads_but_never_merges(tmp_path):
    directory = adapter_dir(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors["base_model.model.layers.1.value.lora_B.weight"][0, 0] = float("inf")
    save_file(tensors, directory / "adapter_model.safetensors")
    model = Net()
    load_adapter(model, directory)
    before = model.layers[1].value.weight.clone()
    with pytest.raises(
        LoRAStateError, match=r"into 'layers\.1\.value' gives NaN or Inf in torch\.float32; no weight was changed"
    ):
        merge_lora(model)
    assert torch.equal(model.layers[1].value.weight, before)
