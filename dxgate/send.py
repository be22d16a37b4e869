"""`dxgate send [options] peer port file|folder...`: C-STORE DICOM files in one association, as dcmtk's storescu."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("send", help="C-STORE DICOM files or folders to a peer (storescu's argument order)",
                        description=__doc__)
    sp.add_argument("-aet", "--aetitle", dest="aet", default="DXGATE_SCU", help="calling AE title (default DXGATE_SCU)")
    sp.add_argument("-aec", "--call", dest="aec", default="DXGATE", help="called AE title of the peer (default DXGATE)")
    sp.add_argument("peer", help="host name or address of the peer")
    sp.add_argument("port", type=int, help="TCP port of the peer")
    sp.add_argument("files", type=Path, nargs="+", help="DICOM files, or folders searched recursively")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_gateway.send.scu import send_paths

    report = send_paths(args.files, args.peer, args.port, args.aec, calling_ae=args.aet)
    print(report)
    return 0 if not getattr(report, "failed", 0) else 1
