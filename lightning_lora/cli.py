"""``lightning-lora``: look inside an adapter, or merge one into a base checkpoint, from a shell.

::

    lightning-lora inspect ADAPTER_DIR
    lightning-lora merge --base BASE --adapter ADAPTER_DIR --output OUT [--prefix PREFIX] [--force]

``merge`` needs no model class: it adds ``ΔW = (alpha/r) · B A`` to the base tensors directly,
key by key (``base_model.model.<module>.lora_A.weight`` → ``<prefix><module>.weight``; a block
``<mha>.in_proj_weight[q]`` of a fused attention projection → rows ``0:E`` of
``<prefix><mha>.in_proj_weight``). Exit status: 0 on success, 1 when a file is refused, 2 for a
usage error. Files are read without pickle (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import AdapterFileError, LoRAError
from .io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFile, atomic_write, read_adapter
from .targets import owner_of

PROG = "lightning-lora"
_LIGHTNING_DROPPED = ("optimizer_states", "lr_schedulers", "lightning_lora")


class UsageError(Exception):
    """Bad arguments: exit status 2, with the usage line."""


# ----------------------------------------------------------------------------------- inspect


def inspect_adapter(path: str | os.PathLike) -> str:
    """A report on adapter directory ``path``: config, targets, rank, parameters, bytes, and
    ``‖ΔW‖_F`` of every adapted weight (computed from two ``r × r`` products, never ΔW)."""
    adapter = read_adapter(_adapter_dir(path))
    config, extras = adapter.config, adapter.extras
    made_by = f"lightning-lora {extras['version']}" if "version" in extras else "PEFT (or another writer)"
    scale = "alpha/sqrt(r)" if config.get("use_rslora") else "alpha/r"
    lora_params = sum(a.numel() + b.numel() for a, b in adapter.pairs.values())
    head_params = sum(t.numel() for t in adapter.trainable.values())
    files = [adapter.path / ADAPTER_WEIGHTS, adapter.path / ADAPTER_CONFIG]
    lines = [
        f"adapter     {adapter.path}  (written by {made_by})",
        f"config      r={config['r']}  lora_alpha={config['lora_alpha']}  scale={scale}  "
        f"dropout={config.get('lora_dropout') or 0.0}  rank_pattern={config.get('rank_pattern') or {}}  "
        f"alpha_pattern={config.get('alpha_pattern') or {}}",
        f"targets     {_grouped(config.get('target_modules') or [])}",
        f"trainable   {config.get('modules_to_save') or []}",
        f"parameters  {lora_params:,} in A/B over {len(adapter.pairs)} weights"
        + (f" + {head_params:,} in trainable modules" if head_params else ""),
        "bytes       " + ", ".join(f"{f.name} {f.stat().st_size:,}" for f in files),
        "",
    ]
    rows = [("weight", "shape", "r", "scale", "params", "dtype", "‖ΔW‖_F")]
    for name, (A, B) in sorted(adapter.pairs.items(), key=lambda kv: _natural(kv[0])):
        rows.append(
            (
                name,
                f"{B.shape[0]}×{A.shape[1]}",
                str(A.shape[0]),
                f"{adapter.scaling(name):g}",
                f"{A.numel() + B.numel():,}",
                str(A.dtype).removeprefix("torch."),
                f"{adapter.delta_norm(name):.6g}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
    return "\n".join(lines)


def _grouped(names: Any) -> str:
    """``encoder.layer.*.attention.self.query ×6, ...`` for repeated blocks; a string as is."""
    if isinstance(names, str):
        return names
    groups: dict[str, int] = {}
    for name in names:
        key = re.sub(r"\.\d+\.", ".*.", name)
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in groups.items()) or "[]"


def _natural(name: str) -> list[Any]:
    """Sort key that puts layer.2 before layer.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _adapter_dir(path: str | os.PathLike) -> Path:
    """An adapter directory, also when given one of its two files."""
    path = Path(path)
    return path.parent if path.name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) else path


# ------------------------------------------------------------------------------------- merge


def merge_into_state_dict(
    state_dict: Mapping[str, Tensor], adapter: AdapterFile, prefix: str = ""
) -> dict[str, Tensor]:
    """A copy of ``state_dict`` with every adapted weight ``W ← W + ΔW`` (computed in float32,
    cast once to W's dtype) and the adapter's trainable-module tensors in place of the base's.

    Every tensor is checked before anything is returned: a key the state dict lacks, a shape
    that does not fit, or a merged weight with NaN/Inf is an :class:`AdapterFileError` naming it.
    """
    merged = dict(state_dict)
    for name in sorted(adapter.pairs, key=_natural):
        key, rows = _weight_key(name, prefix)
        if key not in merged:
            raise AdapterFileError(_missing_key_message(key, name, merged, prefix))
        weight = merged[key]
        region = weight if rows is None else weight[rows * weight.shape[0] // 3 : (rows + 1) * weight.shape[0] // 3]
        delta = adapter.delta_weight(name)
        if tuple(region.shape) != tuple(delta.shape):
            raise AdapterFileError(
                f"adapter weight {name!r} makes a ΔW of shape {tuple(delta.shape)}, but {key!r} in the base "
                f"{'has rows of' if rows is not None else 'has'} shape {tuple(region.shape)}; the adapter was "
                f"trained on another base model."
            )
        new_region = (region.float() + delta).to(weight.dtype)
        if not torch.isfinite(new_region).all():
            raise AdapterFileError(
                f"merging {name!r} into {key!r} gives NaN or Inf in {weight.dtype}; nothing was written. "
                f"Check the adapter with `{PROG} inspect`."
            )
        if rows is None:
            merged[key] = new_region
        else:
            third = weight.shape[0] // 3
            merged[key] = torch.cat([weight[: rows * third], new_region, weight[(rows + 1) * third :]])
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


def _weight_key(name: str, prefix: str) -> tuple[str, int | None]:
    """State-dict key of an adapted weight, and which third of its rows (q, k, v) for a block
    of a fused ``in_proj_weight``."""
    owner, label = owner_of(name)
    if label is None:
        return f"{prefix}{name}.weight", None
    if name.endswith("]"):
        return f"{prefix}{owner}.in_proj_weight", "qkv".index(label)
    return f"{prefix}{name}", None


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
    keys = [_weight_key(name, "")[0] for name in adapter.pairs]
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
        try:
            with safe_open(str(path), framework="pt") as f:
                return "safetensors", {"state_dict": {k: f.get_tensor(k) for k in f.keys()}, "metadata": f.metadata()}  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            raise AdapterFileError(f"{path} is not a readable safetensors file ({err}).") from None
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


def merge_files(base: Path, adapter_dir: Path, output: Path, prefix: str | None, force: bool) -> str:
    """Merge the adapter into the base file and write ``output`` atomically; returns a summary."""
    if output.exists() and not force:
        raise UsageError(f"{output} already exists; pass --force to overwrite it.")
    kind, contents = read_base(base)
    if (output.suffix == ".safetensors") != (kind == "safetensors"):
        raise UsageError(
            f"--output {output.name!r} must be of the base's kind ({'a .safetensors file' if kind == 'safetensors' else 'a torch file such as .ckpt or .pt'})."
        )
    state = contents["state_dict"]
    lora_keys = [k for k in state if ".lora_A." in k or ".lora_B." in k]
    if lora_keys or (contents.get("lightning_lora") or {}).get("adapter_only"):
        raise AdapterFileError(
            f"{base} is a checkpoint of a LoRA-adapted model (e.g. {lora_keys[:1] or 'adapter-only'}), not a "
            f"base: merge the adapter into the base model's own checkpoint."
        )
    adapter = read_adapter(_adapter_dir(adapter_dir))
    prefix = detect_prefix(state, adapter) if prefix is None else prefix
    merged = merge_into_state_dict(state, adapter, prefix)
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
    return f"merged {len(adapter.pairs)} weight(s){extra} of {adapter.path} into {base}{where} -> {output} ({output.stat().st_size:,} bytes)"


# -------------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse with git-style errors: the usage line, what went wrong, a suggestion; exit 2."""

    def error(self, message: str) -> NoReturn:
        m = re.search(r"invalid choice: '([^']*)'", message)
        if m:
            close = difflib.get_close_matches(m.group(1), ["inspect", "merge"], n=1)
            message = f"'{m.group(1)}' is not a {PROG} command. See '{PROG} --help'."
            message += f"\n\nThe most similar command is\n\t{close[0]}" if close else ""
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="Work with LoRA adapters (PEFT's file layout) without writing Python.",
        epilog=f"See '{PROG} <command> --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    commands.required = True
    inspect = commands.add_parser(
        "inspect",
        help="show an adapter's config, targets, ranks, sizes and ΔW norms",
        description="Show an adapter directory's config, adapted weights (shape, rank, scale, "
        "parameters, dtype, Frobenius norm of ΔW) and file sizes. Reads safetensors only.",
    )
    inspect.add_argument(
        "path", metavar="PATH", help="adapter directory (adapter_config.json + adapter_model.safetensors)"
    )
    merge = commands.add_parser(
        "merge",
        help="merge an adapter into a base checkpoint and write a plain one",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Add ΔW = (alpha/r)·B·A to the base weights and write a checkpoint of the base's kind,\n"
            "with the base's keys and no LoRA tensors:\n"
            "  .ckpt         a Lightning checkpoint: its state_dict is merged; optimizer and\n"
            "                scheduler states are dropped (the result is a new starting point)\n"
            "  .safetensors  a state dict, metadata kept\n"
            "  .pt .pth ...  a torch state dict\n"
            "Torch files are read with torch.load(weights_only=True): never unpickled."
        ),
        epilog=f"example:\n  {PROG} merge --base base.ckpt --adapter runs/x/lora_adapter --output merged.ckpt",
    )
    merge.add_argument(
        "--base", required=True, type=Path, metavar="BASE", help="base checkpoint: .ckpt, .safetensors, .pt/.pth/.bin"
    )
    merge.add_argument("--adapter", required=True, type=Path, metavar="DIR", help="adapter directory")
    merge.add_argument("--output", required=True, type=Path, metavar="OUT", help="where to write the merged checkpoint")
    merge.add_argument(
        "--prefix",
        default=None,
        help="key prefix of the adapted model inside BASE, e.g. 'model.' for a LightningModule "
        "attribute (default: found from the keys)",
    )
    merge.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.set_defaults(commands={"inspect": inspect, "merge": merge})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 refused file, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = f"{PROG} {args.command}"
    try:
        if args.command == "inspect":
            print(inspect_adapter(args.path))
        else:
            print(merge_files(args.base, args.adapter, args.output, args.prefix, args.force))
    except UsageError as err:
        args.commands[args.command].print_usage(sys.stderr)
        print(f"{sub}: error: {err}", file=sys.stderr)
        return 2
    except LoRAError as err:
        print(f"{sub}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
