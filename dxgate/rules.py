"""`dxgate rules test FOLDER`: show how the configured rules would route the DICOM files in a folder.

Reads headers only, runs the same pure routing as the gateway, and prints a table per study:
each series, the rules it matches, then which model reads which series and where results go, or
why nothing routes. Prints UIDs and technical attributes, never patient data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from dicom_gateway.errors import ConfigError
from dicom_gateway.route.routing import route_study
from dicom_gateway.route.rules import rule_matches, validate_rules
from dicom_gateway.route.series import SeriesSummary, summarise_folder
from dicom_gateway.settings import Rule, Settings
from dxgate.common import add_config_option, settings_of
from inference.errors import InferenceError
from inference.model_repo import RegisteredModel, discover_models

_COLUMNS = ("#", "series UID", "modality", "body part", "orientation", "thick mm", "images", "description",
            "matching rules")


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _series_row(s: SeriesSummary, rules: Sequence[Rule]) -> list[str]:
    matching = [r.name for r in rules if rule_matches(r.match, s)[0]]
    return [
        "" if s.series_number is None else str(s.series_number), s.series_uid, s.modality or "?",
        s.body_part or "?", s.orientation or "?",
        "?" if s.slice_thickness is None else f"{s.slice_thickness:g}", str(s.n_instances),
        (s.series_description or "")[:32], ", ".join(matching) or "-",
    ]


def _load_models(settings: Settings, out: TextIO) -> dict[str, RegisteredModel]:
    try:
        return discover_models(settings.models_dir)
    except InferenceError as exc:
        print(f"warning: cannot load models from {settings.models_dir}: {exc}", file=out)
        return {}


def rules_test_command(folder: Path, settings: Settings, models: Mapping[str, RegisteredModel] | None = None,
                       out: TextIO | None = None) -> int:
    """Print how settings.rules route the DICOM files under folder. Exit status 0 if something routes, else 1.

    models defaults to discover_models(settings.models_dir).
    """
    out = out or sys.stdout
    try:
        validate_rules(settings.rules)
    except ConfigError as exc:
        print(f"error: {exc}", file=out)
        return 1
    if not Path(folder).is_dir():
        print(f"error: {folder} is not a folder", file=out)
        return 1
    series = summarise_folder(Path(folder))
    if not series:
        print(f"no DICOM instances found under {folder}", file=out)
        return 1
    if models is None:
        models = _load_models(settings, out)
    print(f"models installed: {', '.join(f'{m.name} {m.version}' for m in models.values()) or 'none'}", file=out)
    all_destinations = [d.name for d in settings.destinations]
    by_study: dict[str, list[SeriesSummary]] = {}
    for s in series:
        by_study.setdefault(s.study_uid or "?", []).append(s)
    routed = False
    for study_uid, study_series in by_study.items():
        print(f"\nstudy {study_uid}", file=out)
        print(_table([_series_row(s, settings.rules) for s in study_series], _COLUMNS), file=out)
        decisions, reasons = route_study(settings.rules, models, study_series, all_destinations)
        if decisions:
            routed = True
            print("routes:", file=out)
            for d in decisions:
                print(f"  {d.model} {d.model_version} reads series {d.series.describe()}"
                      f" -> {', '.join(d.destinations)}  [rule {d.rule}]", file=out)
        if reasons:
            print("notes:" if decisions else "nothing routes:", file=out)
        for why in reasons:
            print(f"  {why}", file=out)
    return 0 if routed else 1


def register(sub: argparse._SubParsersAction) -> None:
    sp = add_config_option(sub.add_parser("rules", help="show how the routing rules route a folder of DICOM files",
                                          description=__doc__))
    sp.add_argument("action", choices=["test"], help="test: route the folder's studies as the gateway would")
    sp.add_argument("folder", type=Path, help="folder of DICOM files (searched recursively; headers only)")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return rules_test_command(args.folder, settings_of(args))
