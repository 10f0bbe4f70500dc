"""The ``mlm`` command: one sub-command per job, each defined in ``mlm.commands.<name>``.

Command modules import heavy libraries inside their ``run`` functions so that ``mlm --help`` stays fast. Logging is
quiet by default: our own messages at INFO, other libraries' at WARNING and their Python warnings hidden; ``-v``
shows everything at DEBUG.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mlm.config import ConfigError

# Order here is the order in `mlm --help`.
COMMAND_MODULES = [
    "mlm.commands.config",
    "mlm.commands.data",
    "mlm.commands.model",
    "mlm.commands.train",
    "mlm.commands.eval",
    "mlm.commands.export",
    "mlm.commands.compress",
    "mlm.commands.predict",
    "mlm.commands.demo",
    "mlm.commands.serve",
    "mlm.commands.bench",
]


EXIT_CODES = """exit codes:
  0  done
  1  the command ran but some inputs failed (e.g. bad image files among many), or the job failed
     (training diverged or ran out of memory; a --strict data check found a problem)
  2  nothing was done: a bad argument, config value or input file (the message names it)
  130  interrupted"""

# Operating-system errors that mean a path the user gave is wrong: missing, unreadable, a file for a folder.
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)

# Messages of other libraries that say nothing a user can act on.
_NOISE = (
    "Removed shared tensor",  # accelerate, for the LM head tied to the token embedding
    "is an Enum subclass",  # torch, about enums torchao registers when peft/transformers import it
)
# Loggers that print through handlers of their own (torch's), so only a filter on the logger itself drops their noise.
_OWN_HANDLERS = ("torch.utils._pytree",)


class _DropNoise(logging.Filter):
    """Drops library log records that hold a known uninformative text."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the records to drop."""
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


_DROP_NOISE = _DropNoise()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (test capture and redirections replace it)."""

    @property
    def stream(self):
        """The current standard error."""
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        """Ignored: the stream is always the current standard error."""


def setup_logging(verbose: bool) -> None:
    """Our messages at INFO (DEBUG with -v), one line each; libraries at WARNING and their warnings hidden."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)  # a second main() in one process replaces the first one's handler
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    if not verbose:
        handler.addFilter(_DROP_NOISE)
    for name in _OWN_HANDLERS:
        logging.getLogger(name).removeFilter(_DROP_NOISE)
        if not verbose:
            logging.getLogger(name).addFilter(_DROP_NOISE)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("mlm").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)
    if not verbose:
        for variable in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY"):
            os.environ.setdefault(variable, "error")  # read when those libraries are imported, after this


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="mlm",
        description="Shared-weight MLA vision-language model.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages and library logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``mlm`` command line; user mistakes print one line and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        code = args.func(args)
    except (ConfigError, ValueError, *USER_OS_ERRORS) as err:
        print(f"mlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a full disk while saving: the job failed, not the input
        print(f"mlm {args.command}: failed: {err}", file=sys.stderr)
        return 1
    except RecursionError:
        print(f"mlm {args.command}: error: an input file is nested too deeply to read", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
