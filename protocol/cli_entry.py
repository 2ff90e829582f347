"""The one way every `fedboard` entry point runs a parsed command.

The full CLI (device_sim/cli.py) and the stand-alone entries of a device
(`python -m edge_client.commands`) and of a server (`python -m aggregator.commands`) must log
and fail the same way: expected failures (bad config or input, a missing file, a broker that
cannot be reached) become one line on stderr and exit status 2, never a traceback. It lives
in `protocol` because that is the one package both sides import.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# What a user can fix: reported as one line, exit status 2.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, ConnectionError, TimeoutError)


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)


def run_parsed(args: argparse.Namespace, handler: Callable[[argparse.Namespace], int]) -> int:
    """Configure logging from ``args.log_level``, run ``handler(args)``, turn expected errors into exit 2."""
    logging.basicConfig(level=getattr(logging, args.log_level), format=LOG_FORMAT)
    try:
        return handler(args)
    except EXPECTED_ERRORS as exc:
        print(f"fedboard {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run_commands(register: Callable[[argparse._SubParsersAction], None], argv: list[str] | None = None) -> int:
    """A stand-alone `fedboard` with only the sub-commands ``register`` adds (each sets ``handler``)."""
    parser = argparse.ArgumentParser(prog="fedboard")
    add_log_level(parser)
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return run_parsed(args, args.handler)
