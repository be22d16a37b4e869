"""`python -m benchmarks <inference|ingest|e2e|memory|training> [--tiny] [--out DIR] [options]`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import common

MODULES = {
    "inference": "benchmarks.inference_bench",
    "ingest": "benchmarks.ingest_bench",
    "e2e": "benchmarks.e2e_bench",
    "memory": "benchmarks.memory_bench",
    "training": "benchmarks.training_bench",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="name", required=True)
    for name, module in MODULES.items():
        mod = importlib.import_module(module)
        sp = sub.add_parser(name, help=(mod.__doc__ or "").splitlines()[0])
        sp.add_argument("--tiny", action="store_true", help="CI smoke size (seconds, not representative)")
        sp.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/...)")
        mod.add_arguments(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    info = common.machine_info()
    out = common.results_dir(args.out, info)
    module = importlib.import_module(MODULES[args.name])
    common.log(f"benchmark {args.name} -> {out}")
    module.run(args, out, info)
    print(f"results: {out / (args.name + '.json')}, {out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
