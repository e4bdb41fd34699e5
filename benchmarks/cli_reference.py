"""Refresh the help texts in docs/cli.md from the installed `offsite` (run after changing a flag).

Each ```text block that starts with `usage: offsite [COMMAND]` is replaced by that command's
`--help`, at the width the page uses.

    python benchmarks/cli_reference.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
BLOCK = re.compile(r"```text\nusage: offsite(?P<command>(?: [a-z-]+)*?) \[-h\].*?\n```", re.S)


def help_text(command: str) -> str:
    env = {**os.environ, "COLUMNS": "100"}
    argv = [sys.executable, "-m", "offsite.cli", *command.split(), "--help"]
    return subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout.rstrip("\n")


def main() -> None:
    page = PAGE.read_text()
    refreshed = BLOCK.sub(lambda m: f"```text\n{help_text(m['command'])}\n```", page)
    PAGE.write_text(refreshed)
    print(f"{PAGE}: {'updated' if refreshed != page else 'unchanged'}")


if __name__ == "__main__":
    main()
