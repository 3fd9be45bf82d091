"""``lightning-lora``: look inside an adapter, or merge one into a base checkpoint, from a shell.

::

    lightning-lora inspect ADAPTER_DIR
    lightning-lora merge --base BASE --adapter ADAPTER_DIR --output OUT [--prefix PREFIX] [--force]
    lightning-lora suggest ADAPTER_DIR [--energy 0.9 | --budget N]
    lightning-lora resize ADAPTER_DIR --output OUT [--energy E | --budget N | --rank R] [--force]

``merge`` needs no model class: it adds ``ΔW = (alpha/r) · B A`` to the base tensors directly
(:mod:`lightning_lora.export`). Exit status: 0 on success, 1 when a file is refused, 2 for a
usage error. Files are read without pickle (safetensors, or ``torch.load(weights_only=True)``),
and what comes from them is printed with control characters escaped.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .adapter_file import read_adapter
from .advisor import suggest_ranks
from .errors import LoRAError
from .export import PROG, UsageError, as_adapter_dir, merge_files
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .preflight import holds_adapter
from .resize import resize_adapter_file
from .tables import natural_key, render_table, repeated_block
from .untrusted import printable

COMMANDS = ("inspect", "merge", "suggest", "resize")

# ----------------------------------------------------------------------------------- inspect


def inspect_adapter(path: str | os.PathLike) -> str:
    """A report on adapter directory ``path``: config, targets, rank, parameters, bytes, and
    ``‖ΔW‖_F`` of every adapted weight (computed from two ``r × r`` products, never ΔW)."""
    adapter = read_adapter(as_adapter_dir(path))
    config, extras = adapter.config, adapter.extras
    made_by = f"lightning-lora {extras['version']}" if "version" in extras else "PEFT (or another writer)"
    scale = "alpha/sqrt(r)" if config.get("use_rslora") else "alpha/r"
    lora_params = sum(a.numel() + b.numel() for a, b in adapter.pairs.values())
    lora_params += sum(m.numel() for m in adapter.magnitudes.values())
    head_params = sum(t.numel() for t in adapter.trainable.values())
    frozen = "freeze_a=True (LoRA-FA: A not trained)  " if extras.get("freeze_a") else ""
    lines = [
        f"adapter     {adapter.path}  (written by {made_by})",
        f"config      r={config['r']}  lora_alpha={config['lora_alpha']}  scale={scale}  "
        f"use_dora={config.get('use_dora') is True}  {frozen}"
        f"dropout={config.get('lora_dropout') or 0.0}  rank_pattern={config.get('rank_pattern') or {}}  "
        f"alpha_pattern={config.get('alpha_pattern') or {}}",
        f"targets     {_grouped(config.get('target_modules') or [])}",
        f"trainable   {config.get('modules_to_save') or []}",
        f"parameters  {lora_params:,} in A/B{' and DoRA magnitudes' if adapter.magnitudes else ''} over "
        f"{len(adapter.pairs)} weights" + (f" + {head_params:,} in trainable modules" if head_params else ""),
        "bytes       " + ", ".join(f"{n} {adapter.sizes[n]:,}" for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)),
        "",
    ]
    rows = [("weight", "shape", "r", "scale", "params", "dtype", "‖ΔW‖_F")]
    for name, (A, B) in sorted(adapter.pairs.items(), key=lambda kv: natural_key(kv[0])):
        rows.append(
            (
                printable(name),
                "×".join(str(n) for n in (B.shape[0], *A.shape[1:])),  # ΔW's shape; a conv's is its kernel's
                str(A.shape[0]),
                f"{adapter.scaling(name):g}",
                f"{A.numel() + B.numel() + (adapter.magnitudes[name].numel() if name in adapter.magnitudes else 0):,}",
                str(A.dtype).removeprefix("torch."),
                f"{adapter.delta_norm(name):.6g}",
            )
        )
    return "\n".join([printable(line) for line in lines] + render_table(rows))


def _grouped(names: Any) -> str:
    """``encoder.layer.*.attention.self.query ×6, ...`` for repeated blocks; a string as is."""
    if isinstance(names, str):
        return names
    groups: dict[str, int] = {}
    for name in names:
        key = repeated_block(name)
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in groups.items()) or "[]"


# -------------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse with git-style errors: the usage line, what went wrong, a suggestion; exit 2."""

    def error(self, message: str) -> NoReturn:
        m = re.search(r"invalid choice: '([^']*)'", message)
        if m:
            close = difflib.get_close_matches(m.group(1), COMMANDS, n=1)
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
    suggest = commands.add_parser(
        "suggest",
        help="suggest per-layer ranks from a trained adapter's ΔW spectra",
        description="For each adapted weight: its rank, the effective rank of ΔW, and the smallest rank whose best "
        "approximation keeps 90/95/99% of ‖ΔW‖² (Eckart–Young), with the parameters each needs.",
    )
    suggest.add_argument("path", metavar="PATH", help="adapter directory")
    _ranks_rule(suggest)
    resize = commands.add_parser(
        "resize",
        help="write the adapter cut down to smaller ranks (best rank-k approximations)",
        description="Replace each ΔW by its best approximation at the suggested (or given) rank and write a "
        "normal adapter directory (PEFT's format, rank_pattern/alpha_pattern), recording the energy kept.",
    )
    resize.add_argument("path", metavar="PATH", help="adapter directory")
    _ranks_rule(resize, rank=True)
    resize.add_argument("--output", required=True, type=Path, metavar="OUT", help="the new adapter directory")
    resize.add_argument("--force", action="store_true", help="replace OUT if it holds an adapter")
    parser.set_defaults(commands={"inspect": inspect, "merge": merge, "suggest": suggest, "resize": resize})
    return parser


def _ranks_rule(parser: argparse.ArgumentParser, rank: bool = False) -> None:
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--energy", type=float, default=None, help="share of ‖ΔW‖² to keep per weight (default 0.9)")
    rule.add_argument("--budget", type=int, default=None, help="parameters in A/B at most, over all weights")
    if rank:
        rule.add_argument("--rank", type=int, default=None, help="one rank for every weight")


def suggest_command(args: argparse.Namespace) -> str:
    """The advisor's table for the adapter at ``args.path``."""
    return suggest_ranks(as_adapter_dir(args.path), energy=args.energy or 0.9, budget=args.budget).table()


def resize_command(args: argparse.Namespace) -> str:
    """Write the cut-down adapter; refuses to replace the input, or an adapter, without --force."""
    source, output = as_adapter_dir(args.path), args.output
    if output.resolve() == source.resolve():
        raise UsageError(f"--output {str(output)!r} is the adapter being resized; write the new one elsewhere.")
    if holds_adapter(output) and not args.force:
        raise UsageError(f"{str(output)!r} already holds an adapter; pass --force to replace it.")
    suggestion = resize_adapter_file(source, output, ranks=args.rank, energy=args.energy, budget=args.budget)
    return f"{suggestion.table()}\nwrote {output}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 refused file or OS error, 2 usage
    error). Every error is one ``error:`` line; names from files are printed escaped."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = f"{PROG} {args.command}"
    try:
        with _terminate_cleanly():
            if args.command == "inspect":
                print(inspect_adapter(args.path))
            elif args.command == "merge":
                print(printable(merge_files(args.base, args.adapter, args.output, args.prefix, args.force)))
            else:
                run = suggest_command if args.command == "suggest" else resize_command
                print("\n".join(printable(line) for line in run(args).splitlines()))  # names come from a file
    except UsageError as err:
        args.commands[args.command].print_usage(sys.stderr)
        print(f"{sub}: error: {printable(err)}", file=sys.stderr)
        return 2
    except LoRAError as err:
        print(f"{sub}: error: {printable(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # a directory, a read-only place, a full disk...: one line, no traceback
        where = f" {str(err.filename)!r}" if err.filename else ""
        print(f"{sub}: error: cannot access{printable(where)}: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` while a command runs, so a stopped merge removes its
    temporary file (``kill -9`` cannot be caught: the next write to that output removes it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
