"""`dxgate evaluate MODEL DATASET`: run a model as the gateway serves it on a dataset and score it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("evaluate", help="score a model on a dataset (needs the train extra)", description=__doc__)
    sp.add_argument("model", type=Path, help="a model folder, or a model name under models/")
    sp.add_argument("dataset", type=Path, help="a MONAI datalist JSON, or a folder holding one (dataset.json)")
    sp.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="where metrics.json and the plots go (default var/evaluate/NAME-VERSION)")
    sp.add_argument("--first-stage-only", action="store_true",
                    help="without the second stage installed beside the model (the gateway runs both)")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_command  # the training stack loads only here

    metrics = evaluate_command(args.model, args.dataset, args.out, first_stage_only=args.first_stage_only)
    print(json.dumps(metrics, indent=2, default=str))
    return 0
