"""Options and helpers shared by several command groups."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_gateway.settings import Settings, load_settings


def add_config_option(parser: argparse.ArgumentParser, default: object = None) -> argparse.ArgumentParser:
    """`--config FILE`: the gateway's YAML configuration (embedded defaults without it)."""
    parser.add_argument("--config", type=Path, default=default, metavar="FILE",
                        help="YAML configuration (start from `dxgate config example`; embedded defaults without it)")
    return parser


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings the command's `--config` names (DXGATE_* variables applied)."""
    return load_settings(getattr(args, "config", None))
