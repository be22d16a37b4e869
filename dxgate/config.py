"""`dxgate config example|check`: print a complete commented configuration, or validate one."""

from __future__ import annotations

import argparse
import json
import sys

from dxgate.common import add_config_option, settings_of


def register(sub: argparse._SubParsersAction) -> None:
    sp = add_config_option(sub.add_parser("config", help="print an example configuration or check one",
                                          description=__doc__))
    sp.add_argument("action", choices=["example", "check"],
                    help="example: print a commented configuration; check: validate --config and print it resolved")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_gateway.route.rules import validate_rules
    from dicom_gateway.settings import example_config

    if args.action == "example":
        sys.stdout.write(example_config())
        return 0
    settings = settings_of(args)
    validate_rules(settings.rules)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0
