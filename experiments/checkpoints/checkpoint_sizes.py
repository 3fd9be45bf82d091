"""Measure Lightning checkpoint sizes for the default job: full vs adapter-only.

Run::

    python experiments/checkpoints/checkpoint_sizes.py [--steps 2] [--limit-train 64]

It builds the default job's model (pretrained all-MiniLM-L6-v2 + mean pooling + a linear head,
TextClassifier with AdamW and its warm-up/decay schedule), fits ``--steps`` steps on the real
DocstringDataModule with ``LoRACallback(r=8, alpha=16, target_modules="all-linear",
trainable_modules=["head"])`` and a ``ModelCheckpoint``, once with the default adapter-only
checkpoints and once with ``full_checkpoints=True``, then prints the two files' sizes and what
is inside them. The numbers in the README come from this script.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lora import LoRACallback
from lightning_lora.task import DocstringDataModule, TextClassifier, load_minilm


def checkpoint(root: Path, full: bool, steps: int, datamodule: DocstringDataModule) -> Path:
    """Fit ``steps`` steps of the default job and return the checkpoint it wrote."""
    L.seed_everything(0)
    model = TextClassifier(load_minilm(), num_classes=datamodule.num_classes, lr=2e-3)
    lora = LoRACallback(r=8, alpha=16, target_modules="all-linear", trainable_modules=["head"], full_checkpoints=full)
    saver = ModelCheckpoint(dirpath=root, every_n_train_steps=steps, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[lora, saver],
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=datamodule)
    (path,) = root.glob("*.ckpt")
    return path


def describe(path: Path) -> dict[str, float]:
    contents = torch.load(path, weights_only=True)
    state = contents["state_dict"]
    optimizer = contents["optimizer_states"][0]["state"]
    return {
        "file bytes": path.stat().st_size,
        "state_dict tensors": len(state),
        "state_dict bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "optimizer bytes": sum(
            t.numel() * t.element_size() for s in optimizer.values() for t in s.values() if torch.is_tensor(t)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="training steps before the checkpoint")
    parser.add_argument("--limit-train", type=int, default=64, help="training examples used")
    args = parser.parse_args()
    datamodule = DocstringDataModule(limit_train=args.limit_train, limit_val=32)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            kind: describe(checkpoint(Path(tmp) / kind, kind == "full", args.steps, datamodule))
            for kind in ("full", "adapter-only")
        }
    full, small = rows["full"]["file bytes"], rows["adapter-only"]["file bytes"]
    print("| checkpoint | file bytes | MB | state_dict tensors | state_dict bytes | AdamW state bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, r in rows.items():
        print(
            f"| {kind} | {r['file bytes']:,} | {r['file bytes'] / 1e6:.2f} | {r['state_dict tensors']} "
            f"| {r['state_dict bytes']:,} | {r['optimizer bytes']:,} |"
        )
    print(f"\nadapter-only is {full / small:.1f}× smaller ({100 * small / full:.1f}% of the full checkpoint).")


if __name__ == "__main__":
    main()
