"""`dxgate models [list]`: the models installed in models_dir; `dxgate models doc`: their pages from their cards."""

from __future__ import annotations

import argparse
from pathlib import Path

from dxgate.common import add_config_option, settings_of

DOCS_DIR = Path("docs/models")


def register(sub: argparse._SubParsersAction) -> None:
    sp = add_config_option(sub.add_parser("models", help="list installed models, or write their pages (doc)",
                                          description=__doc__))
    msub = sp.add_subparsers(dest="action", metavar="{list,doc}", help="list (the default) or doc")
    listing = msub.add_parser("list", help="one line per model: name, version, task, modality, weights hash, use")
    doc = msub.add_parser("doc", help="write docs/models/NAME.md from each model card (models/NAME/metadata.json)")
    for action in (listing, doc):
        add_config_option(action, argparse.SUPPRESS, "YAML configuration naming models_dir")
    doc.add_argument("names", nargs="*", metavar="NAME", help="models to write (default: every model in models_dir)")
    doc.add_argument("--out", type=Path, default=DOCS_DIR, metavar="DIR",
                     help=f"folder for the pages (default {DOCS_DIR})")
    sp.set_defaults(func=run, action="list")


def run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if args.action == "doc":
        from inference.model_doc import write_model_docs

        for page in write_model_docs(settings.models_dir, args.out, args.names):
            print(page)
        return 0
    from inference.model_repo import discover_models

    for name, m in discover_models(settings.models_dir).items():
        c = m.card
        print(f"{name:<22} v{c.version:<4} {c.task:<24} {','.join(c.modality):<6} {c.weights_sha256[:12]}  "
              f"{c.intended_use}")
    return 0
