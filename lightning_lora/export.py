"""Merging an adapter file into a base checkpoint file, with no model class at hand.

``ΔW = (alpha/r) · B A`` is added to the base tensors directly (a DoRA adapter's rows rescaled to
its magnitudes: :meth:`~lightning_lora.adapter_file.AdapterFile.merged`), key by key
(``base_model.model.<module>.lora_A.weight`` → ``<prefix><module>.weight``; a block
``<mha>.in_proj_weight[q]`` of a fused attention projection → rows ``0:E`` of
``<prefix><mha>.in_proj_weight``: :mod:`lightning_lora.names`), with the same fp32 merge as a
model's (:func:`~lightning_lora.layers.merged_block`) on the ``(d_out, d_in)`` matrix of each
tensor (:func:`~lightning_lora.layers.matrix_view`: a conv kernel flattened, an embedding or a
transformers ``Conv1D`` weight transposed). Files are read without pickle
(safetensors, or ``torch.load(weights_only=True)``) and written atomically.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .adapter_file import AdapterFile, read_adapter
from .atomic import atomic_write
from .delta import first_nonfinite, from_matrix, matrix_view, with_block
from .errors import AdapterFileError
from .names import CHECKPOINT_KEY, block_rows, parse_weight_name
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .report import file_merge_report
from .tables import natural_key

PROG = "lightning-lora"
_LIGHTNING_DROPPED = ("optimizer_states", "lr_schedulers", CHECKPOINT_KEY)


class UsageError(Exception):
    """Bad arguments: exit status 2, with the usage line."""


def as_adapter_dir(path: str | Path) -> Path:
    """An adapter directory, also when given one of its two files."""
    path = Path(path)
    return path.parent if path.name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) else path


def merge_into_state_dict(
    state_dict: Mapping[str, Tensor], adapter: AdapterFile, prefix: str = ""
) -> dict[str, Tensor]:
    """A copy of ``state_dict`` with every adapted weight ``W ← W + ΔW`` (computed in float32,
    cast once to W's dtype) and the adapter's trainable-module tensors in place of the base's.

    Every tensor is checked before anything is returned: a key the state dict lacks, a shape
    that does not fit, or a merged weight with NaN/Inf is an :class:`AdapterFileError` naming it.
    """
    merged = dict(state_dict)
    transposed = _transposed_weights(state_dict, adapter, prefix)
    for name in sorted(adapter.pairs, key=natural_key):
        parsed = parse_weight_name(name)
        key = parsed.state_dict_key(prefix)
        if key not in merged:
            raise AdapterFileError(_missing_key_message(key, name, merged, prefix))
        weight = merged[key]
        rows = block_rows(parsed.label, weight.shape[0]) if parsed.fused else None
        flip = name in transposed
        region = weight[rows[0] : rows[1]] if rows is not None else matrix_view(weight, flip)
        A, B = adapter.pairs[name]
        delta_shape = (B.shape[0], *A.shape[1:])  # (d_out, d_in), or a conv's (d_out, in, *kernel)
        expected = delta_shape[::-1] if flip else delta_shape
        found = tuple(region.shape) if rows is not None else tuple(weight.shape)
        if found != expected:
            raise AdapterFileError(
                f"adapter weight {name!r} makes a ΔW of shape {delta_shape}"
                f"{f', stored transposed as {expected}' if flip else ''}, but {key!r} in the base "
                f"{'has rows of' if rows is not None else 'has'} shape {found}; the adapter was trained on another base model."
            )
        new_region = adapter.merged(name, region).to(weight.dtype)
        if first_nonfinite([new_region]) is not None:
            raise AdapterFileError(
                f"merging {name!r} into {key!r} gives NaN or Inf in {weight.dtype}; nothing was written. "
                f"Check the adapter with `{PROG} inspect`."
            )
        if rows is not None:
            merged[key] = with_block(weight, rows, new_region)
        else:
            merged[key] = from_matrix(new_region, weight.shape, flip)
    for key, tensor in adapter.trainable.items():
        full = prefix + key
        if full not in merged:
            raise AdapterFileError(_missing_key_message(full, key, merged, prefix))
        if tuple(merged[full].shape) != tuple(tensor.shape):
            raise AdapterFileError(
                f"trainable-module tensor {key!r} has shape {tuple(tensor.shape)} in the adapter and "
                f"{tuple(merged[full].shape)} in the base."
            )
        merged[full] = tensor.to(merged[full].dtype)
    return merged


def _transposed_weights(state_dict: Mapping[str, Tensor], adapter: AdapterFile, prefix: str) -> set[str]:
    """The adapter's weights whose base tensor is stored ``(d_in, d_out)``, so ``ΔWᵀ`` is added.

    An embedding's keys say so (``lora_embedding_A``); our files list transformers' ``Conv1D``
    weights in their metadata. A PEFT file has only ``fan_in_fan_out``, which PEFT sets when it
    adapted a ``Conv1D`` last: with it, the base's shape tells a ``Conv1D`` from a Linear where
    ``d_out ≠ d_in``, and square weights count as ``Conv1D`` unless a Linear is among the others;
    without it, nothing is transposed. What the file and the base leave open is refused."""
    recorded = adapter.extras.get("fan_in_fan_out")
    if recorded is not None:
        return set(adapter.embedding) | set(recorded)
    square, flipped, plain = [], [], []
    for name, (A, B) in adapter.pairs.items():
        parsed = parse_weight_name(name)
        weight = state_dict.get(parsed.state_dict_key(prefix))
        if name in adapter.embedding or A.dim() != 2 or parsed.label or weight is None or weight.dim() != 2:
            continue
        d_out, d_in = B.shape[0], A.shape[1]
        if d_out == d_in:
            square.append(name)
        else:
            (flipped if tuple(weight.shape) == (d_in, d_out) else plain).append(name)
    ambiguous = flipped[:1] if not adapter.config.get("fan_in_fan_out") else (square[:1] if plain else [])
    if ambiguous:
        raise AdapterFileError(
            f"cannot tell from the adapter whether the base stores {ambiguous[0]!r} transposed (a transformers "
            f"Conv1D) or not: {'the base has it transposed but the file says fan_in_fan_out=false' if flipped else 'it is square, and the file mixes Conv1D and Linear weights'}. "
            f"Merge through the model instead: load_adapter(model, path), then unload_lora(model)."
        )
    if not adapter.config.get("fan_in_fan_out"):
        return set(adapter.embedding)
    return set(adapter.embedding) | set(flipped) | set(square)


def _missing_key_message(key: str, name: str, state: Mapping[str, Tensor], prefix: str) -> str:
    hint = ""
    suffix = key.removeprefix(prefix)
    found = sorted(k for k in state if k.endswith("." + suffix))
    if found:
        hint = f" The base has {found[0]!r}: pass --prefix {found[0].removesuffix(suffix)!r}."
    elif prefix and suffix in state:
        hint = " The base has it without a prefix: drop --prefix."
    else:
        close = difflib.get_close_matches(key, list(state), n=1)
        hint = f" Closest key in the base: {close[0]!r}." if close else ""
    return f"the base has no tensor {key!r} for adapter weight {name!r}.{hint}"


def detect_prefix(state_dict: Mapping[str, Tensor], adapter: AdapterFile) -> str:
    """The prefix under which the adapted model sits in ``state_dict`` ("" or e.g. ``"model."``
    for a LightningModule attribute): the one that gives every adapted weight a key."""
    keys = [parse_weight_name(name).state_dict_key() for name in adapter.pairs]
    candidates = {k[: -len(keys[0])] for k in state_dict if k == keys[0] or k.endswith("." + keys[0])}
    fitting = sorted(p for p in candidates if all(p + k in state_dict for k in keys))
    if len(fitting) == 1:
        return fitting[0]
    if len(fitting) > 1:
        raise UsageError(f"the adapter fits the base under several prefixes {fitting}; choose one with --prefix.")
    return ""  # merge_into_state_dict names the first missing key, with a hint


def read_base(path: Path) -> tuple[str, dict[str, Any]]:
    """``("safetensors" | "lightning" | "torch", contents)`` of a base file, read without pickle."""
    if not path.is_file():
        raise AdapterFileError(f"base checkpoint {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        return "safetensors", _read_safetensors(path)
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError, RuntimeError, EOFError...: all mean "not loadable safely"
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
        m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = (m.group(1) if m else text.strip().split("\n")[0] or type(err).__name__).split(". ")[0].strip()[:160]
        raise AdapterFileError(
            f"{path} cannot be read with torch.load(weights_only=True) ({detail}): it is not a torch file, or it "
            f"holds pickled Python objects besides tensors. lightning-lora never unpickles arbitrary objects; "
            f"re-save the base as a state dict of tensors (or as safetensors)."
        ) from None
    if isinstance(contents, dict) and isinstance(contents.get("state_dict"), Mapping):
        return "lightning", contents
    if isinstance(contents, dict) and contents and all(isinstance(v, Tensor) for v in contents.values()):
        return "torch", {"state_dict": contents}
    raise AdapterFileError(f"{path} holds neither a state dict of tensors nor a Lightning checkpoint ('state_dict').")


def _read_safetensors(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors and metadata, all from one file although ``safe_open`` opens
    the path twice: the file is held open meanwhile and its identity checked before and after,
    so a rename over it in between is seen (and the read repeated) instead of pairing one file's
    header with the other's bytes. No second copy of a large base in memory."""
    for _ in range(3):
        with open(path, "rb") as held:
            before = os.fstat(held.fileno())
            try:
                with safe_open(str(path), framework="pt") as f:
                    contents = {"state_dict": {k: f.get_tensor(k) for k in f.keys()}, "metadata": f.metadata()}  # noqa: SIM118
            except (SafetensorError, ValueError) as err:
                raise AdapterFileError(f"{path} is not a readable safetensors file ({err}).") from None
            after = os.stat(path)
        if (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino):
            return contents
    raise AdapterFileError(f"{path} kept being replaced while it was read; try again when its writer is done.")


def check_output(output: Path, base: Path, adapter_dir: Path) -> None:
    """``--output`` may never be the base checkpoint, a file of the adapter, or a directory,
    ``--force`` or not: compared by resolved path, and by identity where the file exists (a
    hard link or a symlink to the base is the base)."""
    if output.is_dir():
        raise UsageError(f"--output {str(output)!r} is a directory; give the merged checkpoint a file name.")
    protected = {"the base checkpoint (--base)": base}
    protected.update({f"the adapter's {n}": adapter_dir / n for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)})
    for what, path in protected.items():
        same = output.resolve() == path.resolve()
        if not same and output.exists() and path.exists():
            same = os.path.samefile(output, path)
        if same:
            raise UsageError(
                f"--output {str(output)!r} is {what}; merging writes a new file, never over its inputs. "
                f"Choose another output path."
            )


def merge_files(base: Path, adapter_dir: Path, output: Path, prefix: str | None, force: bool) -> str:
    """Merge the adapter into the base file and write ``output`` atomically; returns a summary."""
    check_output(output, base, as_adapter_dir(adapter_dir))
    if output.exists() and not force:
        raise UsageError(f"{output} already exists; pass --force to overwrite it.")
    kind, contents = read_base(base)
    if (output.suffix == ".safetensors") != (kind == "safetensors"):
        raise UsageError(
            f"--output {output.name!r} must be of the base's kind ({'a .safetensors file' if kind == 'safetensors' else 'a torch file such as .ckpt or .pt'})."
        )
    state = contents["state_dict"]
    lora_keys = [k for k in state if ".lora_A." in k or ".lora_B." in k]
    if lora_keys or (contents.get(CHECKPOINT_KEY) or {}).get("adapter_only"):
        raise AdapterFileError(
            f"{base} is a checkpoint of a LoRA-adapted model (e.g. {lora_keys[:1] or 'adapter-only'}), not a "
            f"base: merge the adapter into the base model's own checkpoint."
        )
    adapter = read_adapter(as_adapter_dir(adapter_dir))
    prefix = detect_prefix(state, adapter) if prefix is None else prefix
    merged = merge_into_state_dict(state, adapter, prefix)
    report = file_merge_report(state, merged, adapter, prefix, _transposed_weights(state, adapter, prefix))
    if kind == "safetensors":
        tensors = {k: v.contiguous() for k, v in merged.items()}
        atomic_write(output, lambda tmp: save_file(tensors, str(tmp), metadata=contents.get("metadata")))
    else:
        payload: dict[str, Any] = merged
        if kind == "lightning":
            payload = {k: v for k, v in contents.items() if k not in _LIGHTNING_DROPPED}
            payload["state_dict"] = merged
        atomic_write(output, lambda tmp: torch.save(payload, tmp))
    extra = f" and {len(adapter.trainable)} trainable-module tensor(s)" if adapter.trainable else ""
    where = f" under prefix {prefix!r}" if prefix else ""
    summary = f"merged {len(adapter.pairs)} weight(s){extra} of {adapter.path} into {base}{where} -> {output} ({output.stat().st_size:,} bytes)"
    return f"{summary}\n{report.text()}"
