"""The example task: shipped data, its generator, the DataModule, the encoders and the classifier."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from lightning_lora.task import (
    DocstringDataModule,
    TextClassifier,
    load_minilm,
    mean_pool,
    read_examples,
    tiny_bert,
)
from lightning_lora.task.data import DEFAULT_DATA, EpochShuffle, LengthGroupedBatches
from lightning_lora.task.model import warmup_linear_decay

GENERATOR = Path(__file__).parents[1] / "experiments" / "dataset" / "make_stdlib_docstrings.py"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    """The dataset script, imported from its path (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_stdlib_docstrings", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shipped_meta(generator: ModuleType) -> dict:
    return json.loads(generator.meta_path(DEFAULT_DATA).read_text())


@pytest.fixture(scope="module")
def small_data() -> DocstringDataModule:
    """A fixed, family-mixed slice of the real data with the real MiniLM tokenizer."""
    dm = DocstringDataModule(max_length=32, batch_size=8, limit_train=128, limit_val=64)
    dm.setup("fit")
    return dm


def fit(model: TextClassifier, dm: DocstringDataModule, steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    return trainer


def test_shipped_data_has_one_class_per_family_and_a_large_val_split(generator: ModuleType, shipped_meta: dict) -> None:
    dm = DocstringDataModule()
    assert dm.label_names == sorted(generator.FAMILIES)
    assert dm.num_classes == len(generator.FAMILIES) == shipped_meta["num_classes"] == 20
    assert len(dm.records) == shipped_meta["num_examples"]
    assert {tuple(r) for r in dm.records} == {("text", "label", "module", "kind", "split")}
    assert {r["kind"] for r in dm.records} == {"module", "class", "function"}
    # one accuracy point must be at least 10 validation examples
    assert shipped_meta["splits"]["val"] >= 1000
    assert max(len(r["text"]) for r in dm.records) > 1000  # full docstrings, not first lines
    assert min(len(r["text"]) for r in dm.records) >= generator.MIN_CHARS


def test_splits_are_disjoint_and_texts_unique() -> None:
    records = read_examples(DEFAULT_DATA)
    texts = {split: {r["text"] for r in records if r["split"] == split} for split in ["train", "val", "test"]}
    assert not texts["train"] & texts["val"]
    assert not texts["train"] & texts["test"]
    assert not texts["val"] & texts["test"]
    assert sum(map(len, texts.values())) == len(records)


def test_meta_sha256_matches_shipped_data_file(shipped_meta: dict) -> None:
    assert shipped_meta["sha256"] == hashlib.sha256(DEFAULT_DATA.read_bytes()).hexdigest()
    counted = sum(sum(splits.values()) for splits in shipped_meta["families"].values())
    assert counted == shipped_meta["num_examples"]


def test_generator_is_byte_for_byte_deterministic(generator: ModuleType, tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "d.jsonl.gz", tmp_path / "b" / "d.jsonl.gz"
    generator.write_dataset(first)
    generator.write_dataset(second)
    assert first.read_bytes() == second.read_bytes()
    assert generator.meta_path(first).read_text() == generator.meta_path(second).read_text()
    meta = json.loads(generator.meta_path(first).read_text())
    assert meta["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert max(sum(s.values()) for s in meta["families"].values()) <= generator.CAP_PER_FAMILY


def test_batch_is_padded_to_its_longest_text(small_data: DocstringDataModule) -> None:
    batch = next(iter(small_data.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 8 == batch["labels"].shape[0]
    assert ids.shape[1] == mask.sum(dim=1).max() <= 32
    assert torch.all(ids[mask == 0] == small_data.pad_id)
    assert ((batch["labels"] >= 0) & (batch["labels"] < small_data.num_classes)).all()


def test_limits_keep_a_family_mixed_subset(small_data: DocstringDataModule) -> None:
    assert len(small_data.datasets["train"]) == 128
    assert len(small_data.datasets["val"]) == 64
    assert len(small_data.datasets["test"]) == sum(r["split"] == "test" for r in small_data.records)
    assert len({label for _, label in small_data.datasets["train"]}) >= 10


def test_shuffled_batches_repeat_under_seed_everything(small_data: DocstringDataModule) -> None:
    L.seed_everything(0)
    first = next(iter(small_data.train_dataloader()))["labels"]
    L.seed_everything(0)
    again = next(iter(small_data.train_dataloader()))["labels"]
    assert torch.equal(first, again)


def test_length_grouped_batches_cover_every_example_once_with_similar_lengths() -> None:
    lengths = [int(x) for x in torch.randint(5, 128, (1000,), generator=torch.Generator().manual_seed(0))]
    order = EpochShuffle(1000, seed=7)
    sampler = LengthGroupedBatches(order, lengths, batch_size=16, chunk_batches=10)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(1 <= len(b) <= 16 for b in batches)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 20  # random batches of 16 from 5..127 spread ~100
    assert list(sampler) == batches  # the same epoch gives the same batches
    order.set_epoch(1)
    assert list(sampler) != batches  # a new epoch, a new order
    order.set_epoch(0)
    assert list(sampler) == batches  # ... that depends on the epoch alone (exact resume)


def test_evaluation_batches_are_sorted_by_length() -> None:
    lengths = [3, 9, 1, 7, 5]
    batches = LengthGroupedBatches(range(5), lengths, batch_size=2, chunk_batches=None)
    assert list(batches) == [[1, 3], [4, 0], [2]] and len(batches) == 3


def test_training_order_follows_seed_everything_and_lightning_sets_the_epoch(small_data: DocstringDataModule) -> None:
    L.seed_everything(3)
    loader = small_data.train_dataloader()
    L.seed_everything(3)
    assert list(small_data.train_dataloader().batch_sampler) == list(loader.batch_sampler)
    from lightning.fabric.utilities.data import _set_sampler_epoch

    _set_sampler_epoch(loader, 5)
    assert loader.batch_sampler.sampler.epoch == 5


def test_encoder_trains_with_dropout_unless_frozen(small_data: DocstringDataModule) -> None:
    encoder = tiny_bert().eval()  # from_pretrained hands encoders over in eval mode
    assert TextClassifier(encoder, small_data.num_classes).encoder.training
    assert not TextClassifier(tiny_bert(), small_data.num_classes, freeze_encoder=True).encoder.training


def test_mean_pool_ignores_padding() -> None:
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(states, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_schedule_warms_up_then_decays_without_a_zero_step() -> None:
    factor = warmup_linear_decay(warmup_steps=10, total_steps=100)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == factor(10) == 1.0
    assert 0.0 < factor(99) < factor(50) < 1.0


def test_trainer_fits_tiny_classifier_with_one_param_group(
    small_data: DocstringDataModule,
) -> None:
    L.seed_everything(0)
    model = TextClassifier(tiny_bert(), small_data.num_classes, class_names=small_data.label_names)
    trainer = fit(model, small_data)
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))
    assert trainer.lr_scheduler_configs[0].interval == "step"
    metrics = trainer.validate(model, small_data, verbose=False)[0]
    assert {"val/loss", "val/acc", "val/f1"} <= set(metrics)
    assert 0.0 <= metrics["val/acc"] <= 1.0


def test_head_lr_puts_the_head_in_its_own_group_that_lora_keeps(
    small_data: DocstringDataModule, tmp_path: Path
) -> None:
    from lightning_lora import LoRACallback, lora_parameters

    L.seed_everything(0)
    model = TextClassifier(tiny_bert(), small_data.num_classes, lr=1e-3, head_lr=1e-2)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path,  # where the adapter is saved without a logger
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            LoRACallback(r=2, target_modules=["query", "value"], trainable_modules=["head"], merge_on_fit_end=False)
        ],
    )
    trainer.fit(model, small_data)
    encoder_group, head_group = trainer.optimizers[0].param_groups
    assert [id(p) for p in encoder_group["params"]] == [id(p) for p in lora_parameters(model)]
    assert [id(p) for p in head_group["params"]] == [id(p) for p in model.head.parameters()]
    assert head_group["initial_lr"] == 1e-2 and encoder_group["initial_lr"] == 1e-3


def test_frozen_encoder_stays_bit_identical_and_only_head_learns(
    small_data: DocstringDataModule,
) -> None:
    L.seed_everything(0)
    model = TextClassifier(tiny_bert(), small_data.num_classes, lr=1e-2, freeze_encoder=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, small_data)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not model.encoder.training and model.head.training


def test_load_minilm_gives_pretrained_384d_sentence_encoder(
    small_data: DocstringDataModule,
) -> None:
    encoder = load_minilm().eval()
    assert encoder.config.hidden_size == 384
    assert 22.5e6 < sum(p.numel() for p in encoder.parameters()) < 22.8e6
    assert encoder.pooler is None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_data.tokenizer_path, local_files_only=True)
    sentences = [
        "Open a file and return a stream.",
        "Read the contents of a file from disk.",
        "Return the day of the week for a date.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder(batch["input_ids"], attention_mask=batch["attention_mask"])
    emb = F.normalize(mean_pool(states.last_hidden_state, batch["attention_mask"]), dim=-1)
    assert emb.shape == (3, 384)
    # pretrained weights: the two file sentences are closer to each other than to the date one
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1
