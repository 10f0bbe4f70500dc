"""Sub-commands of the ``mlm`` command line, one module per group; each exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Add ``--config FILE`` and repeatable ``--set section.key=value`` to a parser."""
    parser.add_argument("--config", "-c", required=required, help="YAML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )


def config_from_args(args: argparse.Namespace):
    """Load the config named by ``--config`` with the ``--set`` overrides applied."""
    from mlm.config import load_config

    return load_config(args.config, args.overrides)
