"""Resuming from an end-of-epoch checkpoint: 8 steps straight against 4 steps, a checkpoint, and
4 more steps after resuming, with LoRA in one process, under DDP and under FSDP2 (2 CPU ranks),
without LoRA, and with a validation loop. Prints the batches each resumed run trained on and how
far its adapter (or weights) ends from the uninterrupted run's (the README's "Checkpoints and
resume" quotes the result):

    python experiments/checkpoints/resume_replay.py [--out DIR]

Each (kind, phase) runs in a process of its own, as Lightning's DDP launcher re-runs this script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lightning_lora import LoRACallback  # noqa: E402
from lightning_lora.state import has_lora  # noqa: E402
from tests.distributed_train import Reseed, ShardedClassifier, TinyClassifier  # noqa: E402

KINDS = ("one process", "ddp", "fsdp2", "without LoRA", "with validation")


class WithValidation(TinyClassifier):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def val_dataloader(self):
        return self.train_dataloader()


class Batches(L.Callback):
    """Records the first feature of each training batch (which batch it was)."""

    def __init__(self, out: Path) -> None:
        self.out, self.seen = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(round(float(batch[0][0, 0]), 4))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.out.write_text(" ".join(map(str, self.seen)))
            if not has_lora(pl_module):  # the LoRA runs compare their saved adapters
                save_file(
                    {k: v.detach().contiguous() for k, v in pl_module.state_dict().items()},
                    self.out.with_suffix(".safetensors"),
                )


def run(kind: str, phase: str, out: Path) -> None:
    module = {"fsdp2": ShardedClassifier, "with validation": WithValidation}.get(kind, TinyClassifier)()
    strategy = {"ddp": DDPStrategy(), "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)}
    callbacks: list[L.Callback] = [Reseed(), Batches(out / phase)]
    if kind != "without LoRA":
        adapter_dir = str(out / f"adapter_{phase}")
        callbacks.append(
            LoRACallback(r=4, target_modules="all-linear", adapter_dir=adapter_dir, merge_on_fit_end=False)
        )
    if phase == "first":
        callbacks.append(ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_epochs=1, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 if kind in ("ddp", "fsdp2") else 1,
        strategy=strategy.get(kind, "auto"),
        max_steps=4 if phase == "first" else 8,
        logger=False,
        enable_checkpointing=phase == "first",
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=str(out),
        use_distributed_sampler=False,
    )
    ckpt = str(sorted((out / "ckpt").iterdir())[-1]) if phase == "resumed" else None
    trainer.fit(module, ckpt_path=ckpt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--run", nargs=2, metavar=("KIND", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp())
    if args.run:
        kind, phase = args.run
        run(kind, phase, out / kind.replace(" ", "_"))
        return
    for kind in KINDS:
        for phase in ("straight", "first", "resumed"):
            (out / kind.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "--out", str(out), "--run", kind, phase]
            subprocess.run(cmd, check=True, capture_output=True)
        where = out / kind.replace(" ", "_")
        files = {p: where / f"adapter_{p}" / "adapter_model.safetensors" for p in ("straight", "resumed")}
        if kind == "without LoRA":
            files = {p: where / f"{p}.safetensors" for p in ("straight", "resumed")}
        straight, resumed = load_file(files["straight"]), load_file(files["resumed"])
        diff = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
        print(
            f"{kind:16s} batches after resuming: {(where / 'resumed').read_text():40s} "
            f"straight run's steps 5-8: {' '.join((where / 'straight').read_text().split()[4:]):32s} "
            f"max |Δ| at the end: {diff:.3g}"
        )


if __name__ == "__main__":
    main()
