"""`dxgate models`: list the models installed in models_dir, with version, task and weights hash."""

from __future__ import annotations

import argparse

from dxgate.common import add_config_option, settings_of


def register(sub: argparse._SubParsersAction) -> None:
    sp = add_config_option(sub.add_parser("models", help="list installed models", description=__doc__))
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inference.model_repo import discover_models

    settings = settings_of(args)
    for name, m in discover_models(settings.models_dir).items():
        c = m.card
        print(f"{name:<22} v{c.version:<4} {c.task:<24} {','.join(c.modality):<6} {c.weights_sha256[:12]}  "
              f"{c.intended_use}")
    return 0
