"""The ``mlm`` command: one sub-command per job, each defined in ``mlm.commands.<name>``.

Command modules import heavy libraries inside their ``run`` functions so that ``mlm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mlm.config import ConfigError

# Order here is the order in `mlm --help`.
COMMAND_MODULES = [
    "mlm.commands.config",
    "mlm.commands.data",
    "mlm.commands.model",
    "mlm.commands.train",
    "mlm.commands.eval",
    "mlm.commands.predict",
    "mlm.commands.demo",
    "mlm.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="mlm", description="Shared-weight MLA vision-language model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``mlm`` command line; user mistakes print one line and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        code = args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"mlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
