"""Set before any test imports lightning_lora: Triton's interpreter is chosen when a kernel is
defined (``lightning_lora.kernels``, imported with the package), and it is how the kernels'
logic runs on CI's CPUs (tests/test_kernels.py). Nothing else here uses Triton: the kernels are
off by default, and on CPU they run only when a test forces them."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
