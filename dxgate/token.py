"""`dxgate token new NAME --role ROLE`: a fresh API bearer token and the `api_tokens` entry that accepts it.

Nothing is stored: the token is printed once, the configuration keeps only its SHA-256.
"""

from __future__ import annotations

import argparse
import secrets

import yaml

ROLES = ("read", "operate", "admin")


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("token", help="make API bearer tokens", description=__doc__)
    tsub = sp.add_subparsers(dest="action", required=True, metavar="{new}")
    tn = tsub.add_parser("new", help="print a fresh token and its api_tokens entry (nothing is stored)")
    tn.add_argument("name", help="the token's name, recorded as the actor of the replays it asks for")
    tn.add_argument("--role", choices=ROLES, default="read",
                    help="read: GET only; operate: also replay and re-run jobs; admin: everything (default read)")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_gateway.api.auth import token_sha256
    from dicom_gateway.settings_security import ApiToken
    from dxgate.errors import CommandError

    token = secrets.token_urlsafe(32)
    try:
        entry = ApiToken(name=args.name, role=args.role, sha256=token_sha256(token))
    except ValueError as exc:
        raise CommandError(f"token name {args.name!r}: letters, digits and _ . @ - only, at most 64") from exc
    print(f"token: {token}")
    print("# the configuration keeps only the SHA-256; add this entry to api_tokens (the token is not shown again):")
    print(yaml.safe_dump({"api_tokens": [entry.model_dump()]}, sort_keys=False), end="")
    return 0
