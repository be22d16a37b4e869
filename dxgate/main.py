"""The `dxgate` command: serve, config, token, synth, send, rules, jobs, models, train, evaluate, bench.

`main` is the one place where an error becomes a message on stderr and an exit status: subcommands
raise. Command modules import their heavy dependencies when they run, so `dxgate send` works without
the training stack and the gateway starts without importing torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dicom_gateway.errors import GatewayError
from dxgate import __version__, bench, config, evaluate, jobs, models, rules, send, serve, synth, token, train
from dxgate.errors import CommandError
from inference.errors import InferenceError

COMMAND_GROUPS = (serve, config, token, synth, send, rules, jobs, models, train, evaluate, bench)
EXIT_ERROR = 2          # a command that could not run as asked
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dxgate", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--version", action="version", version=f"dxgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="`dxgate COMMAND --help` for its options")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors raised on purpose by every package, with the training stack's when it is installed."""
    errors: list[type[BaseException]] = [CommandError, GatewayError, InferenceError, OSError]
    if "training.errors" in sys.modules:
        errors.append(sys.modules["training.errors"].TrainingError)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dxgate: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _expected_errors() as exc:
        print(f"dxgate {args.command}: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
