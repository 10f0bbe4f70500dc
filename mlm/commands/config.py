"""``mlm config show``: print a resolved config."""

from __future__ import annotations

import argparse

from mlm.commands import config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``config`` command group."""
    parser = sub.add_parser("config", help="inspect configs")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the resolved config (file + --set overrides) as YAML")
    show.add_argument("config", help="YAML config file")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=show_config)


def show_config(args: argparse.Namespace) -> int:
    """Print the resolved config as YAML."""
    print(config_from_args(args).to_yaml(), end="")
    return 0
