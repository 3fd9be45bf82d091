"""The `lightning-lora` command line: inspect and merge, through main(argv) and as a real process."""

import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_lora import inject_lora, lora_layers, lora_parameters, save_adapter
from lightning_lora.cli import main


class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.query, self.value, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.query(x)) * self.value(x))


class LitNet(L.LightningModule):
    """The adapted network lives under the attribute ``model``: keys ``model.query.weight``."""

    def __init__(self, d=16):
        super().__init__()
        self.save_hyperparameters()
        self.model = Net(d)

    def forward(self, x):
        return self.model(x)


def randomize(model, std=0.2):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def adapted(model, tmp_path, **config):
    """``model`` with a trained-looking adapter, saved to ``tmp_path / 'adapter'``."""
    config.setdefault("target_modules", ["query", "value"])
    inject_lora(model, r=2, **config)
    randomize(model)
    save_adapter(model, tmp_path / "adapter")
    return model.eval()


def lightning_checkpoint(module: L.LightningModule, path: Path) -> Path:
    """A real Lightning checkpoint of ``module`` (optimizer state included)."""
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.strategy.optimizers = [torch.optim.AdamW(module.parameters())]
    trainer.save_checkpoint(path)
    return path


def run(*argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------ inspect


def test_inspect_reports_config_targets_sizes_and_the_norm_of_each_update(tmp_path, capsys):
    model = adapted(Net(), tmp_path, alpha=8, trainable_modules=["head"])
    code, out, err = run("inspect", tmp_path / "adapter", capsys=capsys)
    assert code == 0 and err == ""
    assert "r=2  lora_alpha=8.0  scale=alpha/r" in out
    assert "targets     query, value" in out and "trainable   ['head']" in out
    assert "parameters  128 in A/B over 2 weights + 51 in trainable modules" in out
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert f"adapter_model.safetensors {size:,}" in out
    for t in lora_layers(model):
        norm = torch.linalg.matrix_norm(t.layer.delta_weight("default")).item()
        row = next(line for line in out.splitlines() if line.startswith(t.name + " "))
        assert row.split()[1:6] == ["16×16", "2", "4", "64", "float32"]
        assert float(row.split()[-1]) == pytest.approx(norm, rel=1e-5)


def test_inspect_says_when_a_was_frozen(tmp_path, capsys):
    adapted(Net(), tmp_path, freeze_a=True)
    code, out, _ = run("inspect", tmp_path / "adapter", capsys=capsys)
    assert code == 0 and "use_dora=False  freeze_a=True (LoRA-FA: A not trained)  dropout=0.0" in out
    adapted(Net(), tmp_path / "plain")
    assert "freeze_a" not in run("inspect", tmp_path / "plain" / "adapter", capsys=capsys)[1]


def test_console_script_and_module_run_as_processes(tmp_path):
    adapted(Net(), tmp_path)
    script = Path(sys.executable).with_name("lightning-lora")
    for command in ([str(script)], [sys.executable, "-m", "lightning_lora.cli"]):
        done = subprocess.run([*command, "inspect", str(tmp_path / "adapter")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "query" in done.stdout and "‖ΔW‖_F" in done.stdout
    done = subprocess.run([str(script), "inspect", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert done.returncode == 1
    assert (
        done.stderr.startswith("lightning-lora inspect: error: adapter directory ") and "does not exist" in done.stderr
    )


# -------------------------------------------------------------------------------------- merge


def test_merge_into_a_lightning_checkpoint_gives_a_plain_checkpoint_of_the_adapted_model(tmp_path, capsys):
    base = lightning_checkpoint(LitNet(), tmp_path / "base.ckpt")
    model = adapted(Net(), tmp_path)  # adapter saved from the bare Net: keys without 'model.'
    code, out, _ = run(
        "merge", "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "merged.ckpt", capsys=capsys
    )
    assert code == 0
    assert "merged 2 weight(s)" in out and "under prefix 'model.'" in out
    merged = torch.load(tmp_path / "merged.ckpt", weights_only=True)
    original = torch.load(base, weights_only=True)
    assert list(merged["state_dict"]) == list(original["state_dict"])
    assert "optimizer_states" not in merged and merged["hyper_parameters"] == {"d": 16}
    restored = LitNet.load_from_checkpoint(tmp_path / "merged.ckpt").eval()  # strict, no lightning_lora
    with torch.no_grad():
        torch.testing.assert_close(restored(X), model(X), rtol=0, atol=1e-5)


def test_merge_into_safetensors_handles_fused_attention_blocks(tmp_path, capsys):
    def transformer():
        torch.manual_seed(0)
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2).eval()

    save_file(transformer().state_dict(), tmp_path / "base.safetensors", metadata={"note": "kept"})
    model = adapted(transformer(), tmp_path, target_modules=["self_attn", "linear1"], mha_projections=["q", "v"])
    code, _, _ = run(
        "merge",
        "--base",
        tmp_path / "base.safetensors",
        "--adapter",
        tmp_path / "adapter",
        "--output",
        tmp_path / "out.safetensors",
        capsys=capsys,
    )
    assert code == 0
    plain = transformer()
    plain.load_state_dict(load_file(tmp_path / "out.safetensors"), strict=True)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-5)
        assert not torch.allclose(plain(x), transformer()(x), atol=1e-3)


def test_merge_into_a_torch_state_dict_with_an_explicit_prefix(tmp_path, capsys):
    torch.save({f"net.{k}": v for k, v in Net().state_dict().items()}, tmp_path / "base.pt")
    model = adapted(Net(), tmp_path)
    code, _, _ = run(
        "merge",
        "--base",
        tmp_path / "base.pt",
        "--adapter",
        tmp_path / "adapter",
        "--output",
        tmp_path / "out.pt",
        "--prefix",
        "net.",
        capsys=capsys,
    )
    assert code == 0
    plain = Net()
    plain.load_state_dict(
        {k.removeprefix("net."): v for k, v in torch.load(tmp_path / "out.pt", weights_only=True).items()}
    )
    with torch.no_grad():
        torch.testing.assert_close(plain(X), model(X), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- errors


@pytest.fixture
def files(tmp_path):
    torch.save(Net().state_dict(), tmp_path / "base.pt")
    adapted(Net(), tmp_path)
    return tmp_path


def merge(files, capsys, *extra, base="base.pt", adapter="adapter", output="out.pt"):
    return run(
        "merge", "--base", files / base, "--adapter", files / adapter, "--output", files / output, *extra, capsys=capsys
    )


def test_an_existing_output_is_kept_unless_forced(files, capsys):
    (files / "out.pt").write_text("precious")
    code, out, err = merge(files, capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: lightning-lora merge [-h]")
    assert err.endswith(
        f"lightning-lora merge: error: {files / 'out.pt'} already exists; pass --force to overwrite it.\n"
    )
    assert (files / "out.pt").read_text() == "precious"
    assert merge(files, capsys, "--force")[0] == 0


@pytest.mark.parametrize(
    ("setup", "kwargs", "code", "message"),
    [
        (None, {"base": "missing.pt"}, 1, r"base checkpoint '.*missing\.pt' does not exist\."),
        (None, {"adapter": "nowhere"}, 1, r"adapter directory '.*nowhere' does not exist"),
        (
            None,
            {"output": "out.safetensors"},
            2,
            r"--output 'out\.safetensors' must be of the base's kind \(a torch file such as \.ckpt or \.pt\)",
        ),
        (
            "pickle",
            {},
            1,
            r"cannot be read with torch\.load\(weights_only=True\) \(Unsupported global: GLOBAL .*Net.*never unpickles arbitrary objects",
        ),
        (
            "narrow",
            {},
            1,
            r"adapter weight 'query' makes a ΔW of shape \(16, 16\), but 'query\.weight' in the base has shape \(8, 8\)",
        ),
        (
            "prefixed",
            {},
            1,
            r"the base has no tensor 'query\.weight' for adapter weight 'query'\. The base has 'net\.query\.weight': pass --prefix 'net\.'",
        ),
        ("lora", {}, 1, r"is a checkpoint of a LoRA-adapted model \(e\.g\. \['query\.lora_A\.default'\]\), not a base"),
        (
            "poison",
            {},
            1,
            r"merging 'value' into 'value\.weight' gives NaN or Inf in torch\.float32; nothing was written",
        ),
    ],
)
def test_bad_inputs_fail_with_a_message_and_the_right_exit_status(files, capsys, setup, kwargs, code, message):
    extra = ()
    if setup == "pickle":
        torch.save(Net(), files / "base.pt")  # a whole pickled module: refused, never executed
    elif setup == "narrow":
        torch.save(Net(d=8).state_dict(), files / "base.pt")
    elif setup == "prefixed":
        torch.save({f"net.{k}": v for k, v in Net().state_dict().items()}, files / "base.pt")
        extra = ("--prefix", "")  # found by itself otherwise
    elif setup == "lora":
        model = Net()
        inject_lora(model, target_modules=["query"])
        torch.save(model.state_dict(), files / "base.pt")
    elif setup == "poison":
        weights = load_file(files / "adapter" / "adapter_model.safetensors")
        weights["base_model.model.value.lora_B.weight"][0, 0] = float("inf")
        save_file(weights, files / "adapter" / "adapter_model.safetensors")
    got, out, err = merge(files, capsys, *extra, **kwargs)
    assert (got, out) == (code, "")
    assert err.count("error:") == 1
    assert re.search(message, err), err
    assert not (files / "out.pt").exists() and not (files / "out.safetensors").exists()


def test_usage_errors_exit_2_with_the_usage_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--adapter", "x", "--output", "y"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lightning-lora merge") and "the following arguments are required: --base" in err
    with pytest.raises(SystemExit) as exit_:
        main(["inpsect", "x"])
    assert exit_.value.code == 2
    assert "'inpsect' is not a lightning-lora command. See 'lightning-lora --help'." in capsys.readouterr().err
