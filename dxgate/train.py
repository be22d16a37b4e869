"""`dxgate train TASK --config FILE`: generate data, train, score held-out, export to ONNX and register."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dxgate.errors import CommandError

TASKS = ["lung-nodule", "spine-vertebrae", "lung-nodule-candidates"]


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("train", help="train and register a model (needs the train extra)", description=__doc__)
    sp.add_argument("task", choices=TASKS,
                    help="lung-nodule-candidates: the lung model's second stage (needs models/lung_nodule_ct)")
    sp.add_argument("--config", type=Path, required=True, metavar="FILE",
                    help="training recipe (the shipped ones are under training/configs/)")
    sp.add_argument("--second-stage", type=Path, metavar="CONFIG",
                    help="lung-nodule: then train, calibrate and register the second stage of this config with it "
                         "(the whole lung model in one command)")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.second_stage is not None and args.task != "lung-nodule":
        raise CommandError("--second-stage goes with lung-nodule only")
    from training.workflow import train_model, train_second_stage  # the training stack loads only here

    if args.task == "lung-nodule-candidates":
        result = train_second_stage(args.config)
    else:
        result = train_model(args.task, args.config, args.second_stage)
    print(json.dumps(result, indent=1, default=str))
    return 0
