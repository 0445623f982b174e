"""The `medclear` router (medclear/cli/main.py): every command it lists is the one that
runs, with the line `--help` shows for it, and `--help` loads none of the heavy clients."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medclear.cli.main import COMMANDS, first_sentence, load, unwrapped

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("grpc", "aiokafka", "clickhouse_driver", "rocksdict", "smartcard", "hypothesis")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_listed_line_is_the_commands_own_first_sentence(name: str) -> None:
    command = load(name)
    assert command.name == name or COMMANDS[name].command == command.name
    assert COMMANDS[name].help == first_sentence(command.help or "")


def test_first_sentence_stops_at_the_first_full_stop_of_the_first_paragraph() -> None:
    assert first_sentence("One line.\n    Two. Three.\n\n    Other.") == "One line."
    assert first_sentence("No stop at all\n    here") == "No stop at all here"
    assert first_sentence("Version 1.2 is out. Yes.") == "Version 1.2 is out."


def test_help_and_version_load_no_client_library() -> None:
    probe = (
        "import sys\n"
        "from medclear.cli.main import app\n"
        "for args in (['--help'], ['--version']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (args, exc.code)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]


def test_an_unknown_command_is_a_usage_error_naming_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "medclear", "swipe-it"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "No such command 'swipe-it'" in done.stderr


def test_help_paragraphs_are_unwrapped_for_the_terminal_and_lists_keep_their_lines() -> None:
    text = """First line
    goes on.

    A paragraph written
    over three
    lines.
    - an item
      continued
    - another
    1. numbered
    """
    assert unwrapped(text) == (
        "First line goes on.\n\nA paragraph written over three lines.\n"
        "- an item\n  continued\n- another\n1. numbered"
    )
    command = load("up")
    assert command.help is not None and "\n" not in command.help.split("\n\n")[1]
