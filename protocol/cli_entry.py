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
import os
import sys
from collections.abc import Callable
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# What a user can fix: reported as one line, exit status 2.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, ConnectionError, TimeoutError)
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C reached a run that then stopped cleanly and kept what it had done.

    Still a KeyboardInterrupt (a library caller stops as it would have); `kept` is one line
    saying what was written and where, for the user who pressed Ctrl-C.
    """

    def __init__(self, kept: str) -> None:
        super().__init__(kept)
        self.kept = kept


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default; descriptions wrap, indented lines (examples) stay as written.

    An option without a value by default (None, "", []) shows "none"; on/off flags (False) and
    a help text that already names its default are left alone.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or action.required or default is False or default is argparse.SUPPRESS \
                or default == argparse.SUPPRESS:
            return text
        if action.option_strings and (default is None or default == "" or default == []):
            return f"{text} (default: none)".strip()
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks: list[str] = []
        paragraph: list[str] = []
        for line in text.splitlines() + [""]:
            if line.strip() and not line.startswith(" "):
                paragraph.append(line.strip())
                continue
            if paragraph:
                blocks.append(super()._fill_text(" ".join(paragraph), width, indent))
                paragraph = []
            blocks.append(indent + line if line.strip() else "")
        return "\n".join(blocks).rstrip("\n")


def check_out_dir(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` and prove it writable now, so a bad --out fails before a long run, not after it."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".fedboard-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"{option} {path}: cannot write there ({reason}); choose a directory you can "
                         "create and write to") from None
    return out


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS,
                        help="what reaches the console (default: WARNING for simulate, tune and train-central, "
                             "which keep their full INFO log in a file of their output directory; INFO for the "
                             "long-running client and aggregator)")


def console_log_level(args: argparse.Namespace) -> str:
    """The console's level: --log-level when given, else the command's own default (`quiet_log_level`)."""
    return getattr(args, "log_level", None) or getattr(args, "quiet_log_level", None) or "INFO"


def attach_log_file(path: Path, args: argparse.Namespace) -> Path:
    """Also log to ``path`` at INFO (DEBUG with --log-level DEBUG): what a quiet console leaves out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    level = logging.DEBUG if getattr(args, "log_level", None) == "DEBUG" else logging.INFO
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level, level))
    return path


def run_parsed(args: argparse.Namespace, handler: Callable[[argparse.Namespace], int]) -> int:
    """Configure logging (console level from `console_log_level`), run ``handler(args)``, turn expected
    errors into exit 2."""
    level = getattr(logging, console_log_level(args))
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for h in logging.getLogger().handlers:
        h.setLevel(level)
    try:
        return handler(args)
    except EXPECTED_ERRORS as exc:
        print(f"fedboard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line, what was kept, the shell's 128 + SIGINT
        kept = exc.kept if isinstance(exc, RunInterrupted) else ""
        print(f"fedboard {args.command}: interrupted{'; ' + kept if kept else ''}", file=sys.stderr)
        return INTERRUPTED_EXIT


def run_commands(register: Callable[[argparse._SubParsersAction], None], argv: list[str] | None = None) -> int:
    """A stand-alone `fedboard` with only the sub-commands ``register`` adds (each sets ``handler``)."""
    parser = argparse.ArgumentParser(prog="fedboard", formatter_class=HelpFormatter)
    add_log_level(parser)
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return run_parsed(args, args.handler)
