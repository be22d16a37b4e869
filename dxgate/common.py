"""Options and helpers shared by several command groups."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_gateway.settings import Settings, load_settings

CONFIG_HELP = "YAML configuration (start from `dxgate config example`; embedded defaults without it)"


def add_config_option(parser: argparse.ArgumentParser, default: object = None,
                      text: str = CONFIG_HELP) -> argparse.ArgumentParser:
    """`--config FILE`: the gateway's YAML configuration. On a sub-action pass `default=argparse.SUPPRESS`, so that
    `dxgate jobs replay 7 --config F` and `dxgate jobs --config F replay 7` both work."""
    parser.add_argument("--config", type=Path, default=default, metavar="FILE", help=text)
    return parser


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings the command's `--config` names (DXGATE_* variables applied)."""
    return load_settings(getattr(args, "config", None))
