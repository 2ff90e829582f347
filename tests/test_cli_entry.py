"""protocol/cli_entry.py: every entry point logs and fails the same way."""
from __future__ import annotations

import argparse

import pytest

from protocol.cli_entry import run_commands


def _register(sub: argparse._SubParsersAction) -> None:
    ok = sub.add_parser("ok")
    ok.add_argument("--value", type=int, default=0)
    ok.set_defaults(handler=lambda args: args.value)
    bad = sub.add_parser("bad")
    bad.set_defaults(handler=lambda args: (_ for _ in ()).throw(ValueError("the key [x] y must be > 0")))
    boom = sub.add_parser("boom")
    boom.set_defaults(handler=lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))


def test_handler_return_value_is_the_exit_code() -> None:
    assert run_commands(_register, ["--log-level", "WARNING", "ok", "--value", "7"]) == 7


def test_expected_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_commands(_register, ["bad"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "fedboard bad: error: the key [x] y must be > 0"


def test_a_bug_is_not_hidden() -> None:
    with pytest.raises(RuntimeError, match="a bug"):
        run_commands(_register, ["boom"])


def test_unknown_log_level_is_refused() -> None:
    with pytest.raises(SystemExit):
        run_commands(_register, ["--log-level", "LOUD", "ok"])


def _register_interrupts(sub: argparse._SubParsersAction) -> None:
    from protocol.cli_entry import RunInterrupted

    plain = sub.add_parser("plain")
    plain.set_defaults(handler=lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    kept = sub.add_parser("kept")
    kept.set_defaults(handler=lambda args: (_ for _ in ()).throw(RunInterrupted("kept 3 of 9 rounds: out/r.json")))


def test_ctrl_c_is_one_line_and_exit_130(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_commands(_register_interrupts, ["plain"]) == 130
    assert capsys.readouterr().err == "fedboard plain: interrupted\n"
    assert run_commands(_register_interrupts, ["kept"]) == 130
    assert capsys.readouterr().err == "fedboard kept: interrupted; kept 3 of 9 rounds: out/r.json\n"
