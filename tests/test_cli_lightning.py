"""LoRACallback through a real LightningCLI: its LoRA fields are init arguments like any other."""

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lightning_lora import LoRACallback, LoRAConfig


class TinyModel(L.LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())


@pytest.fixture(autouse=True)
def no_pytest_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])  # LightningCLI(args=...) warns about pytest's own


def lora_callback(*args: str) -> LoRACallback:
    cli = LightningCLI(
        TinyModel,
        run=False,
        args=list(args),
        save_config_callback=None,
        seed_everything_default=False,
        trainer_defaults={"logger": False, "enable_progress_bar": False, "enable_model_summary": False},
    )
    (callback,) = (c for c in cli.trainer.callbacks if isinstance(c, LoRACallback))
    return callback


def test_command_line_flags_set_the_callbacks_lora_fields():
    callback = lora_callback(
        "--trainer.callbacks+=lightning_lora.LoRACallback",
        "--trainer.callbacks.r=4",
        "--trainer.callbacks.target_modules=[net.0,net.2]",
        "--trainer.callbacks.merge_on_fit_end=false",
    )
    assert callback.config == LoRAConfig(r=4, target_modules=["net.0", "net.2"])
    assert callback.merge_on_fit_end is False


def test_a_yaml_config_with_init_args_builds_the_same_callback(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_lora.LoRACallback\n"
        "      init_args: {r: 4, target_modules: [net.0, net.2], merge_on_fit_end: false}\n"
    )
    callback = lora_callback(f"--config={config}")
    assert callback.config == LoRAConfig(r=4, target_modules=["net.0", "net.2"])
    assert callback.merge_on_fit_end is False


def test_a_field_of_the_wrong_type_or_name_stops_the_parser(capsys):
    with pytest.raises(SystemExit):
        lora_callback("--trainer.callbacks+=lightning_lora.LoRACallback", "--trainer.callbacks.r=abc")
    with pytest.raises(SystemExit):
        lora_callback("--trainer.callbacks+=lightning_lora.LoRACallback", "--trainer.callbacks.rank=4")
    assert "rank" in capsys.readouterr().err
