"""Files are data, never code or commands: every malformed or hostile adapter file is refused
by name, quickly, before a model is touched; the command line prints no terminal escapes and
never writes over its own inputs."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_lora import AdapterFileError, inject_lora, load_adapter, save_adapter
from lightning_lora.cli import main


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.query, self.value, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.query(x) + self.value(x))


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    model = Net()
    inject_lora(model, r=2, target_modules=["query", "value"], trainable_modules=["head"])
    return save_adapter(model, tmp_path / "adapter")


def edited(adapter: Path, config: dict | None = None, tensors=None, metadata: dict | None = None) -> Path:
    """A copy of ``adapter`` with config fields set, tensors edited, metadata extras replaced."""
    copy = adapter.with_name("edited")
    shutil.copytree(adapter, copy)
    if config:
        fields = json.loads((copy / "adapter_config.json").read_text())
        fields.update(config)
        (copy / "adapter_config.json").write_text(json.dumps(fields))
    if tensors or metadata is not None:
        with safe_open(str(copy / "adapter_model.safetensors"), "pt") as f:
            meta, found = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if tensors:
            tensors(found)
        if metadata is not None:
            meta["lightning_lora"] = json.dumps(metadata)
        save_file(found, str(copy / "adapter_model.safetensors"), metadata=meta)
    return copy


def refused(path: Path, match: str) -> None:
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=match):
        load_adapter(model, path)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("r", "abc", r"field 'r' must be a positive integer \(the rank\), found 'abc' \(str\)"),
        ("r", None, r"field 'r' must be a positive integer .* found None"),
        ("r", [4], r"field 'r' must be a positive integer .* found \[4\] \(list\)"),
        ("r", 4.5, r"field 'r' must be a positive integer .* found 4\.5 \(float\)"),  # never read as 4
        ("r", 0, r"field 'r' must be a positive integer .* found 0"),
        ("lora_alpha", "16", r"field 'lora_alpha' must be a positive number .* found '16' \(str\)"),
        ("use_rslora", "false", r"field 'use_rslora' must be true or false \(a JSON boolean, not a string\)"),
        ("rank_pattern", [1], r"field 'rank_pattern' must be an object mapping module names to positive integers"),
        ("alpha_pattern", "x", r"field 'alpha_pattern' must be an object mapping module names to positive numbers"),
    ],
)
def test_a_malformed_config_field_is_refused_naming_the_file_field_and_value(adapter, field, value, match):
    refused(edited(adapter, config={field: value}), rf"adapter_config\.json: {match}")


def test_malformed_metadata_is_refused_naming_the_field(adapter):
    refused(
        edited(adapter, metadata={"init": 5}),
        r"metadata field 'init' must be one of \['zeros_b', 'gaussian', 'pissa'.*found 5",
    )


def test_deeply_nested_json_is_refused_without_a_recursion_error(adapter):
    nested = edited(adapter)
    (nested / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(nested, r"nested too deeply to be an adapter's JSON")


@pytest.mark.parametrize("key", ["(a+)+$", "(.*a){20}", "(a|aa)+$", "(?=a)b"])
def test_a_pattern_key_that_could_take_exponential_time_is_refused_at_once(adapter, key):
    hostile = edited(adapter, config={"rank_pattern": {key: 2}})
    started = time.perf_counter()
    refused(hostile, r"rank_pattern key .* is refused")
    assert time.perf_counter() - started < 1.0
    assert main(["inspect", str(hostile)]) == 1


def test_ordinary_pattern_keys_still_match_as_in_peft(adapter):
    patterns = {"rank_pattern": {"^q.*y$": 2, "value": 2}}
    load_adapter(Net(), edited(adapter, config=patterns, metadata={}))  # metadata as PEFT writes it: none of ours


def test_a_tensor_outside_the_declared_modules_is_refused_by_name(adapter):
    def smuggle(tensors):
        tensors["base_model.model.query.weight"] = torch.zeros(8, 8)

    refused(edited(adapter, tensors=smuggle), r"holds 'base_model\.model\.query\.weight', which is neither a LoRA")


def test_a_tensor_name_with_terminal_escapes_is_refused_and_printed_escaped(adapter):
    def rename(tensors):
        tensors["base_model.model.\x1b[31mquery.lora_A.weight"] = tensors.pop("base_model.model.query.lora_A.weight")

    refused(edited(adapter, tensors=rename), r"a tensor named 'base_model\.model\.\\\\x1b\[31mquery")


def test_inspect_prints_no_terminal_escape_sequences(adapter, capsys):
    hostile = edited(adapter, config={"target_modules": ["\x1b[2J\x1b[31mred", "query"]})
    assert main(["inspect", str(hostile)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J" in out


# ------------------------------------------------------------------ the command line's outputs


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.pt"
    torch.save(Net().state_dict(), path)
    return path


def merge(base: Path, adapter: Path, output: Path, *flags: str) -> int:
    return main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(output), *flags])


def test_the_output_may_never_be_an_input_even_with_force(base, adapter, capsys):
    original = base.read_bytes(), (adapter / "adapter_model.safetensors").read_bytes()
    assert merge(base, adapter, base, "--force") == 2
    assert merge(base, adapter, adapter / "adapter_model.safetensors", "--force") == 2
    err = capsys.readouterr().err
    assert "is the base checkpoint (--base); merging writes a new file, never over its inputs" in err
    assert "is the adapter's adapter_model.safetensors" in err
    assert (base.read_bytes(), (adapter / "adapter_model.safetensors").read_bytes()) == original


def test_os_errors_on_the_output_are_one_error_line(base, adapter, tmp_path, capsys):
    assert merge(base, adapter, tmp_path) == 2  # a directory
    assert merge(base, adapter, base / "under" / "merged.pt") in (1, 2)  # a parent that is a file
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 2 and all(line.startswith("lightning-lora merge: error:") for line in lines)
    assert "Traceback" not in "".join(lines)
