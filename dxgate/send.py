"""`dxgate send [options] peer port file|folder...`: C-STORE DICOM files in one association, as dcmtk's storescu."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("send", help="C-STORE DICOM files or folders to a peer (storescu's argument order)",
                        description=__doc__, prefix_chars="-+")
    sp.add_argument("-aet", "--aetitle", dest="aet", default="DXGATE_SCU", help="calling AE title (default DXGATE_SCU)")
    sp.add_argument("-aec", "--call", dest="aec", default="DXGATE", help="called AE title of the peer (default DXGATE)")
    sp.add_argument("+tls", "--enable-tls", dest="tls", nargs=2, metavar=("KEY", "CERT"), type=Path,
                    help="TLS (PS3.15 Annex B) presenting this PEM private key and certificate, as storescu +tls")
    sp.add_argument("+cf", "--add-cert-file", dest="ca", type=Path,
                    help="with +tls: PEM CA certificate(s) the peer's certificate is verified against "
                         "(default: the system's CAs)")
    sp.add_argument("peer", help="host name or address of the peer")
    sp.add_argument("port", type=int, help="TCP port of the peer")
    sp.add_argument("files", type=Path, nargs="+", help="DICOM files, or folders searched recursively")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_gateway.send.scu import send_paths
    from dicom_gateway.settings_security import TlsSettings

    tls = None
    if args.tls is not None:
        key, cert = args.tls
        tls = TlsSettings(port=args.port, cert_file=cert, key_file=key, ca_file=args.ca)  # port: unused by a client
    elif args.ca is not None:
        raise SystemExit("+cf (--add-cert-file) needs +tls KEY CERT")
    report = send_paths(args.files, args.peer, args.port, args.aec, calling_ae=args.aet, tls=tls)
    print(report)
    return 0 if not getattr(report, "failed", 0) else 1
