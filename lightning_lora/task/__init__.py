"""The example task: classify Python standard-library docstrings by module family.

``DocstringDataModule`` serves the shipped data tokenised for all-MiniLM-L6-v2, ``TextClassifier``
is a plain mean-pooling classifier (LoRA is attached from outside by the callback), and
``load_minilm`` / ``tiny_bert`` build the real encoder and a tiny random one for tests.
"""

from lightning_lora.task.data import DocstringDataModule, pad_collate, read_examples
from lightning_lora.task.encoders import load_minilm, minilm_path, tiny_bert
from lightning_lora.task.model import TextClassifier, mean_pool

__all__ = [
    "DocstringDataModule",
    "TextClassifier",
    "load_minilm",
    "mean_pool",
    "minilm_path",
    "pad_collate",
    "read_examples",
    "tiny_bert",
]
