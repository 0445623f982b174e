"""Every shell example of the README, run in order as a new user would, on the default
stack (mutual TLS and terminal security on), in a fresh directory: each must work as
printed. A command shown with a leading `!` is one the README says is refused: it must
exit 3 (declined), not 0 and not 1 (an error)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from medclear.infra.exits import Exit

pytestmark = [
    pytest.mark.stack,
    pytest.mark.kafka,
    pytest.mark.clickhouse,
    pytest.mark.smsc,
    pytest.mark.timeout(900),
]

README = Path(__file__).resolve().parents[2] / "README.md"
SKIPPED = ("make ", ". .venv/bin/activate")  # the whole-job commands and the venv: done
DECLINED_EXIT = int(Exit.DECLINED)


def readme_commands(text: str) -> list[str]:
    """The commands of the README's ```sh blocks, in order: continuation lines joined,
    trailing comments dropped, the whole-job and venv lines left out."""
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#") and not line.startswith(SKIPPED):
                commands.append(line)
    return commands


def script_of(commands: list[str]) -> str:
    """One bash script: each command checked for the exit status the README promises."""
    lines = ["set -u"]
    for command in commands:
        refused = command.startswith("! ")
        run = command[2:] if refused else command
        want = DECLINED_EXIT if refused else 0
        lines += [
            f"echo {shlex.quote('>>> ' + command)}",
            run,
            "rc=$?",
            f'if [ "$rc" -ne {want} ]; then echo "README command exited $rc, not {want}: "'
            f"{shlex.quote(command)}; exit 1; fi",
        ]
    return "\n".join(lines) + "\n"


def test_the_readme_commands_are_found() -> None:
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert commands[0] == "medclear up" and commands[-1] == "medclear down"
    assert any(c.startswith("medclear card change-pin") and "--pin" in c for c in commands)
    assert any(c.startswith("! medclear pos swipe") for c in commands)
    assert not any("S26000001" in c for c in commands)  # a green card in the seeded city


def test_every_shell_example_of_the_readme_works_as_printed(tmp_path: Path) -> None:
    commands = readme_commands(README.read_text(encoding="utf-8"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCLEAR_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["COLUMNS"] = "120"
    log = tmp_path / "readme.log"
    try:
        with log.open("w") as out:
            done = subprocess.run(
                ["bash", "-c", script_of(commands)],
                cwd=tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=840,
                check=False,
            )
        text = log.read_text(errors="replace")
        assert done.returncode == 0, text[-6000:]
        assert "OK (1)" in text and "CARD_PRE_LOST (32)" in text
        assert "Traceback" not in text
        cards = tmp_path / ".medclear" / "seed" / "cards.csv"
        assert oct(cards.stat().st_mode & 0o777) == "0o600"
        assert "pin" in cards.read_text().splitlines()[0]
    finally:
        subprocess.run(
            ["bash", "-c", "medclear down --wipe"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=300,
            check=False,
        )
