"""A plain text classifier: encoder -> mean pooling -> linear ``head``.

It knows nothing about LoRA: adapters are attached from outside by a Lightning callback, which is
why the optimizer is built over ``self.parameters()`` in one param group (the callback strips the
frozen ones) and why nothing here assumes which parameters are trainable.

Shapes: ``input_ids`` and ``attention_mask`` (B, T) -> token states (B, T, H) -> pooled (B, H) ->
logits (B, C). Pooling is the mean of the token states where ``attention_mask`` is 1, as
sentence-transformers does for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of ``states`` (B, T, H) over positions where ``attention_mask`` (B, T) is 1."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def warmup_linear_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor for step ``s``: rises linearly to 1 over ``warmup_steps``, then falls linearly.

    The factor is ``(s + 1) / warmup_steps`` during warm-up and ``(total - s) / (total - warmup)``
    after it, so no step of a ``total_steps`` run trains with a learning rate of exactly zero.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


class TextClassifier(L.LightningModule):
    """Sequence classifier over any encoder that returns ``last_hidden_state`` (e.g. BertModel).

    Args:
        encoder: maps ``input_ids, attention_mask`` to an output with ``last_hidden_state``
            (B, T, H); its ``config.hidden_size`` gives H.
        num_classes: number of labels C.
        lr: peak AdamW learning rate, reached after warm-up.
        head_lr: the new head's own peak learning rate (a second param group); ``None`` uses
            ``lr``. A freshly initialised head wants a far larger step than pretrained weights
            or LoRA adapters do.
        weight_decay: AdamW decoupled weight decay, applied to every parameter.
        warmup_ratio: fraction of ``trainer.estimated_stepping_batches`` spent warming up.
        freeze_encoder: head-only baseline: the encoder gets ``requires_grad=False`` and stays in
            eval mode (no dropout) while training, so it acts as a fixed feature extractor. Do not
            combine with a LoRA callback, whose adapters would then be frozen out of dropout too.
        class_names: label names, index-aligned with the logits; saved for readers of checkpoints.
        dropout: dropout on the pooled embedding, before the head.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        freeze_encoder: bool = False,
        class_names: list[str] | None = None,
        dropout: float = 0.1,
        head_lr: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names but num_classes={num_classes}; "
                "pass num_classes=len(class_names) (e.g. datamodule.num_classes)."
            )
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        # Lightning keeps submodule modes as it finds them at fit start, and from_pretrained
        # returns an encoder in eval mode: set the mode the run needs (dropout on unless frozen).
        self.encoder.train(not freeze_encoder)
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_f1 = MulticlassF1Score(num_classes, average="macro")

    def train(self, mode: bool = True) -> TextClassifier:
        """Like ``nn.Module.train``, but a frozen encoder stays in eval mode (no dropout)."""
        super().train(mode)
        if self.hparams.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) for token ids and mask of shape (B, T)."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(self.dropout(mean_pool(states, attention_mask)))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(
        self,
        batch: dict[str, torch.Tensor],
        prefix: str,
        acc: MulticlassAccuracy,
        f1: MulticlassF1Score,
    ) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        acc.update(logits, batch["labels"])
        f1.update(logits, batch["labels"])
        size = batch["labels"].shape[0]
        self.log(f"{prefix}/loss", loss, on_step=False, on_epoch=True, batch_size=size)
        self.log(f"{prefix}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{prefix}/f1", f1, on_step=False, on_epoch=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_f1)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc, self.test_f1)

    def configure_optimizers(self) -> dict:
        """AdamW with linear warm-up then linear decay per step: one group over all parameters,
        or, with ``head_lr``, the head in a second group at its own learning rate.

        Parameters with ``requires_grad=False`` are included on purpose: AdamW skips parameters
        whose ``grad`` is None, and the LoRA callback prunes the frozen ones itself.
        """
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "TextClassifier's linear LR schedule needs a finite run length, but the Trainer "
                "has none; set Trainer(max_steps=...) or Trainer(max_epochs=...)."
            )
        warmup = int(self.hparams.warmup_ratio * total)
        if self.hparams.head_lr is None:
            groups = [{"params": list(self.parameters())}]
        else:
            head = {id(p) for p in self.head.parameters()}
            groups = [
                {"params": [p for p in self.parameters() if id(p) not in head]},
                {"params": list(self.head.parameters()), "lr": self.hparams.head_lr},
            ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = LambdaLR(optimizer, warmup_linear_decay(warmup, int(total)))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
