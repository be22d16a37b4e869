"""The `dxgate` command: serve, config, synth, send, rules, jobs, models, train, evaluate, bench.

Subcommands import their modules lazily, so `dxgate send` works without the training stack and the
gateway starts without importing torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dicom_gateway.errors import ConfigError, GatewayError


def _settings(args: argparse.Namespace):  # noqa: ANN202
    from dicom_gateway.settings import load_settings

    return load_settings(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_gateway.server import serve

    return serve(_settings(args))


def cmd_config(args: argparse.Namespace) -> int:
    from dicom_gateway.settings import example_config

    if args.action == "example":
        sys.stdout.write(example_config())
        return 0
    settings = _settings(args)
    from dicom_gateway.rules import validate_rules

    validate_rules(settings.rules)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from training.synthetic import write_chest_ct_study, write_spine_ct_study

    kwargs = {"seed": args.seed, "rows": args.rows}
    if args.slices is not None:
        kwargs["slices"] = args.slices
    if args.kind == "chest-ct":
        study = write_chest_ct_study(args.out, nodules=args.nodules, **kwargs)
    else:
        study = write_spine_ct_study(args.out, **kwargs)
    print(f"wrote {len(study.files)} instances of study {study.study_uid} to {args.out}")
    print(f"annotations: {study.annotations_path}")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from dicom_gateway.scu import send_folder

    report = send_folder(args.folder, args.host, args.port, args.aec, calling_ae=args.aet)
    print(report)
    return 0 if not getattr(report, "failed", 0) else 1


def cmd_rules(args: argparse.Namespace) -> int:
    from dicom_gateway.rules_cli import rules_test_command

    return rules_test_command(args.folder, _settings(args))


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicom_gateway.jobstore import JobStore
    from dicom_gateway.states import JobState

    settings = _settings(args)
    if not settings.db_path.exists():
        raise ConfigError(f"no job store at {settings.db_path} (is data_dir right?)")
    store = JobStore(settings.db_path)
    if args.action == "list":
        state = JobState(args.state) if args.state else None
        for row in store.list_jobs(state=state, limit=args.limit):
            print(f"{row['id']:>6}  {row['state']:<8} {row['model']:<22} {row['study_uid']}  "
                  f"{row['failed_stage'] or ''} {row['reason'] or ''}")
        return 0
    row = store.get_job(args.id)
    if row is None:
        print(f"no job {args.id}", file=sys.stderr)
        return 1
    if args.action == "show":
        job = dict(row)
        job["events"] = [dict(e) for e in store.job_events(args.id)]
        job["deliveries"] = [dict(d) for d in store.deliveries(args.id)]
        print(json.dumps(job, indent=2, default=str))
        return 0
    new_state = store.replay(args.id)
    print(f"job {args.id} -> {new_state}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from inference.model_repo import discover_models

    settings = _settings(args)
    for name, m in discover_models(settings.models_dir).items():
        c = m.card
        print(f"{name:<22} v{c.version:<4} {c.task:<24} {','.join(c.modality):<6} {c.weights_sha256[:12]}  "
              f"{c.intended_use}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.second_stage is not None and args.task != "lung-nodule":
        print("dxgate train: --second-stage goes with lung-nodule only", file=sys.stderr)
        return 2
    if args.task == "lung-nodule-candidates":
        from training.second_stage import train_command as second_stage_command

        return second_stage_command(args.config)
    from training.cli import train_command

    return train_command(args.task, args.config, args.second_stage)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from inference.errors import InferenceError
    from training.evaluate import evaluate_command
    from training.loaders.luna16 import LoaderError

    try:
        metrics = evaluate_command(args.model, args.dataset, args.out, first_stage_only=args.first_stage_only)
    except (LoaderError, InferenceError) as exc:
        print(f"dxgate evaluate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.__main__ import main as bench_main

    return bench_main([args.name, *args.rest])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dxgate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", type=Path, default=None, help="YAML config (see `dxgate config example`)")
        return sp

    with_config(sub.add_parser("serve", help="run the gateway")).set_defaults(func=cmd_serve)
    sp = with_config(sub.add_parser("config", help="print an example config or check one"))
    sp.add_argument("action", choices=["example", "check"])
    sp.set_defaults(func=cmd_config)

    sp = sub.add_parser("synth", help="write a synthetic study (test/demo data, not patient data)")
    sp.add_argument("kind", choices=["chest-ct", "spine-ct"])
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--slices", type=int, default=None)
    sp.add_argument("--nodules", type=int, default=3)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--rows", type=int, default=512)
    sp.set_defaults(func=cmd_synth)

    sp = sub.add_parser("send", help="C-STORE every DICOM file of a folder (one association, like storescu)")
    sp.add_argument("folder", type=Path)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, required=True)
    sp.add_argument("--aec", default="DXGATE", help="called AE title")
    sp.add_argument("--aet", default="DXGATE_SCU", help="calling AE title")
    sp.set_defaults(func=cmd_send)

    sp = with_config(sub.add_parser("rules", help="routing rules"))
    sp.add_argument("action", choices=["test"])
    sp.add_argument("folder", type=Path)
    sp.set_defaults(func=cmd_rules)

    sp = with_config(sub.add_parser("jobs", help="inspect and replay jobs"))
    jsub = sp.add_subparsers(dest="action", required=True)
    jl = jsub.add_parser("list")
    jl.add_argument("--state", default=None)
    jl.add_argument("--limit", type=int, default=50)
    actions = [jl]
    for action in ("show", "replay"):
        ja = jsub.add_parser(action)
        ja.add_argument("id", type=int)
        actions.append(ja)
    for ja in actions:  # `dxgate jobs replay 7 --config F` as well as `dxgate jobs --config F replay 7`
        ja.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_jobs)

    with_config(sub.add_parser("models", help="list installed models")).set_defaults(func=cmd_models)

    sp = sub.add_parser("train", help="train a model (needs the train extra)")
    sp.add_argument("task", choices=["lung-nodule", "spine-vertebrae", "lung-nodule-candidates"],
                    help="lung-nodule-candidates: the lung model's second stage (needs models/lung_nodule_ct)")
    sp.add_argument("--config", type=Path, required=True)
    sp.add_argument("--second-stage", type=Path, metavar="CONFIG",
                    help="lung-nodule: then train, calibrate and register the second stage of this config with it "
                         "(the whole lung model in one command)")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("evaluate", help="evaluate a model folder on a dataset manifest")
    sp.add_argument("model", type=Path)
    sp.add_argument("dataset", type=Path)
    sp.add_argument("--out", type=Path, default=None)
    sp.add_argument("--first-stage-only", action="store_true",
                    help="without the second stage installed beside the model (the gateway runs both)")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("bench", help="run a benchmark (inference, ingest, e2e, memory, training)")
    sp.add_argument("name")
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GatewayError as exc:
        print(f"dxgate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
