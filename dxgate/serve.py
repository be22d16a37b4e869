"""`dxgate serve`: run the gateway (SCP, assembly, routing, worker, sender and HTTP API) in this process."""

from __future__ import annotations

import argparse

from dxgate.common import add_config_option, settings_of


def register(sub: argparse._SubParsersAction) -> None:
    sp = add_config_option(sub.add_parser("serve", help="run the gateway until SIGTERM or Ctrl-C",
                                          description=__doc__))
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_gateway.server import serve

    return serve(settings_of(args))
