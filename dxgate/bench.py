"""`dxgate bench NAME [options]`: run a benchmark; it prints and saves its figures under benchmarks/results/."""

from __future__ import annotations

import argparse

NAMES = ["inference", "ingest", "e2e", "memory", "training"]


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("bench", help="run a benchmark (inference, ingest, e2e, memory, training)",
                        description=__doc__, add_help=False)
    sp.add_argument("name", choices=NAMES, help="which benchmark (`dxgate bench NAME --help` for its options)")
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from benchmarks.__main__ import main as bench_main

    return bench_main([args.name, *args.rest])
