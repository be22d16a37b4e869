"""`dxgate jobs list|show|replay|rerun`: inspect the job store, replay or re-run a failed or finished job."""

from __future__ import annotations

import argparse
import json

from dxgate.common import add_config_option, settings_of
from dxgate.errors import CommandError

CONFIG_HELP = "YAML configuration naming data_dir (the job store)"
CLI_ACTOR = "cli"  # the actor recorded in the job's event, as an API replay records its token's name


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("jobs", help="list, show, replay and re-run jobs", description=__doc__)
    jsub = sp.add_subparsers(dest="action", required=True, metavar="{list,show,replay,rerun}")
    jl = jsub.add_parser("list", help="the newest jobs, one line each")
    jl.add_argument("--state", default=None, help="only jobs in this state (QUEUED, RUNNING, ..., FAILED)")
    jl.add_argument("--limit", type=int, default=50, help="at most this many jobs (default 50)")
    actions = [jl]
    for action, what in (("show", "one job with its events and deliveries, as JSON"),
                         ("replay", "re-send a job's results, or re-run it when it failed before encoding"),
                         ("rerun", "run a failed or finished job's inference again, even when it has results")):
        ja = jsub.add_parser(action, help=what)
        ja.add_argument("id", type=int, help="job id (see `dxgate jobs list`)")
        actions.append(ja)
    for ja in actions:
        add_config_option(ja, argparse.SUPPRESS, CONFIG_HELP)
    add_config_option(sp, None, CONFIG_HELP)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_gateway.states import JobState
    from dicom_gateway.store import Store

    settings = settings_of(args)
    if not settings.db_path.exists():
        raise CommandError(f"no job store at {settings.db_path} (is data_dir right?)")
    store = Store(settings.db_path)
    if args.action == "list":
        try:
            state = JobState(args.state.upper()) if args.state else None
        except ValueError as exc:
            raise CommandError(f"--state {args.state}: not one of {', '.join(JobState)}") from exc
        for row in store.jobs.find(state=state, limit=args.limit):
            print(f"{row['id']:>6}  {row['state']:<8} {row['model']:<22} {row['study_uid']}  "
                  f"{row['failed_stage'] or ''} {row['reason'] or ''}")
        return 0
    row = store.jobs.get(args.id)
    if row is None:
        raise CommandError(f"no job {args.id}", exit_code=1)
    if args.action == "show":
        job = dict(row)
        job["events"] = [dict(e) for e in store.jobs.events(args.id)]
        job["deliveries"] = [dict(d) for d in store.deliveries.of_job(args.id)]
        print(json.dumps(job, indent=2, default=str))
        return 0
    if args.action == "rerun":
        new_state = store.jobs.rerun(args.id, actor=CLI_ACTOR)
    else:
        new_state = store.jobs.replay(args.id, actor=CLI_ACTOR)
    print(f"job {args.id} -> {new_state}")
    return 0
