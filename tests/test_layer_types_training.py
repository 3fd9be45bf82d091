"""Every layer type end to end: GPT-2 (Conv1D, "all-linear"), a ResNet and a diffusers UNet (conv
targets) and GPT-2's embeddings train through LoRACallback on a real Trainer, are merged at fit
end into a model of the original module types with the trained model's outputs, and the saved
adapter round-trips through PEFT with the same outputs."""

import copy

import lightning as L
import pytest
import torch
from peft import PeftModel
from torch.utils.data import DataLoader

from lightning_lora import LoRACallback, load_adapter, lora_parameters, read_adapter

from .tiny_models import gpt2, resnet, types_and_keys, unet

CASES = {
    "gpt2 all-linear": (gpt2, {"target_modules": "all-linear"}),
    # BatchNorm's running statistics are buffers that training updates: the adapter keeps them
    # only for modules it saves whole (trainable_modules, PEFT's modules_to_save).
    "resnet convs": (resnet, {"trainable_modules": ["normalization"]}),
    "unet convs": (unet, {}),
    "gpt2 embeddings": (gpt2, {"target_modules": ["wte", "wpe"]}),
}


class Regression(L.LightningModule):
    """Pulls a model's output towards a fixed random target: enough for the adapters to move."""

    def __init__(self, case):
        super().__init__()
        self.model = case.model
        self._run = case.run
        with torch.no_grad():
            self.register_buffer("target", torch.randn_like(case.run(case.model)))

    def forward(self):
        return self._run(self.model)

    def training_step(self, batch, batch_idx):
        return (self() - self.target).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def outputs(module):
    module.eval()
    with torch.no_grad():
        return module()


@pytest.mark.parametrize("name", CASES)
def test_trains_merges_to_the_original_types_and_round_trips_through_peft(name, tmp_path):
    make, fields = CASES[name]
    case = make()
    module = Regression(case)
    untrained = copy.deepcopy(module)
    adapter_dir = tmp_path / "lora_adapter"
    fields = {"target_modules": case.targets, **fields}
    callback = LoRACallback(r=4, alpha=8, adapter_dir=str(adapter_dir), **fields)
    trainer = L.Trainer(
        accelerator="cpu", callbacks=[callback], max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module.train(), DataLoader(range(8), batch_size=2))

    merged = outputs(module)
    assert not lora_parameters(module)
    assert types_and_keys(module) == types_and_keys(untrained)
    assert not torch.allclose(merged, outputs(untrained), atol=1e-4)  # it trained

    trained = copy.deepcopy(untrained)
    load_adapter(trained, adapter_dir)  # the trained, unmerged model
    torch.testing.assert_close(outputs(trained), merged, rtol=0, atol=1e-5)

    # The callback names weights relative to the served model (adapter_root="auto": the Hugging
    # Face model the LightningModule holds), so PEFT loads the file into that model itself.
    root = read_adapter(adapter_dir).extras["root"]
    served = copy.deepcopy(untrained)
    peft = PeftModel.from_pretrained(served.get_submodule(root) if root else served, adapter_dir)
    if root:  # the PEFT model in the served model's place
        parent, _, child = root.rpartition(".")
        setattr(served.get_submodule(parent), child, peft)
    torch.testing.assert_close(outputs(served), merged, rtol=0, atol=1e-5)
    peft.save_pretrained(tmp_path / "from_peft")
    back = copy.deepcopy(untrained)
    load_adapter(back, tmp_path / "from_peft")
    torch.testing.assert_close(outputs(back), merged, rtol=0, atol=1e-5)
