"""What the whole-directory save costs: ``save_adapter`` now (a staged sibling directory swapped
in with one rename) against the release before it (two files, each replaced by its own rename),
for an adapter the size of the default job's (1.4 MB) and one of 100 MB, median of 7 saves into a
directory that already holds an adapter (the case the swap exists for).

    python experiments/reliability/save_cost.py --before PATH_TO_OLD_CHECKOUT

``--before`` is a checkout of the earlier release (its ``lightning_lora`` package is imported in
a subprocess). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SIZES = {"1.4 MB (default job)": (1, 4096, 42), "100 MB": (8, 4096, 384)}  # layers, width, rank

PROGRAM = textwrap.dedent(
    """
    import json, sys, tempfile, time
    import torch
    from torch import nn
    from lightning_lora import inject_lora, save_adapter
    layers, width, rank = map(int, sys.argv[1:4])
    model = nn.Sequential(*[nn.Linear(width, width, bias=False, device="meta") for _ in range(layers)])
    model.to_empty(device="cpu")
    inject_lora(model, r=rank, target_modules="all-linear", init="gaussian")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp + "/adapter")  # the directory already holds an adapter from here on
        for _ in range(7):
            started = time.perf_counter()
            save_adapter(model, tmp + "/adapter")
            times.append(time.perf_counter() - started)
        size = sum(f.stat().st_size for f in __import__("pathlib").Path(tmp, "adapter").glob("*"))
    print(json.dumps({"times": times, "bytes": size}))
    """
)


def measure(package_root: Path, layers: int, width: int, rank: int) -> dict:
    env_path = str(package_root)
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(layers), str(width), str(rank)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        cwd=tempfile.gettempdir(),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the earlier release")
    args = parser.parse_args()
    now = Path(__file__).resolve().parents[2]
    print("| adapter | bytes | before: two renames (median) | now: directory swap (median) | now / before |")
    print("|---|---|---|---|---|")
    for label, (layers, width, rank) in SIZES.items():
        old = measure(args.before, layers, width, rank)
        new = measure(now, layers, width, rank)
        a, b = statistics.median(old["times"]), statistics.median(new["times"])
        print(f"| {label} | {new['bytes']:,} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {b / a:.2f}× |")


if __name__ == "__main__":
    main()
