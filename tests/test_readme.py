"""The README's reference sections must match the code they describe."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from gata_ft.config import OPTIONS, option_kind, shown_default

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_hyperparameter_table_lists_every_option_with_its_default_and_help():
    rows = dict(re.findall(r"^\| `(\w+)` \| (\w+ \| `[^`]*` \| .*) \|$", README, re.MULTILINE))
    for name, field in OPTIONS.items():
        shown = shown_default(name)  # "auto" for fp16, "none" for fallback_label
        assert (
            rows.get(name) == f"{option_kind(name).__name__} | `{shown}` | {field.metadata['help']}"
        ), name


def test_ci_runs_the_readme_test_command():
    assert "make test   # set up .venv, then lint and run every test" in README
    assert "make test" in (REPO / ".ci" / "run").read_text().splitlines()


def test_readme_commands_exist_in_the_makefile():
    targets = set(re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))
    commands = re.findall(r"`make ([a-z-]+)`", README)
    assert {"demo", "test", "test-fast", "install"} <= set(commands)
    for command in commands:
        assert command in targets, command


def test_every_documented_subcommand_exists():
    script = Path(sys.prefix) / "bin" / "gata-ft"  # the console script, as a user runs it
    out = subprocess.run([script, "--help"], capture_output=True, text=True, check=False)
    commands = re.findall(r"^gata-ft (\w+)  +\S", README, re.MULTILINE)
    assert len(commands) >= 3
    for command in commands:
        assert f"  {command} " in out.stdout, command


def test_readme_container_commands_are_the_smoke_tests():
    script = (REPO / "container" / "smoke.sh").read_text()
    run_block = script[script.index("# --- the README's local run") : script.index("# --- end of")]
    commands = [line for line in run_block.splitlines()[1:] if line.strip()]
    assert len(commands) >= 10
    for line in commands:
        assert line in README, line
