"""The CLI's whole surface: every command's `--help`, compared with a committed snapshot.

Any change to a command's name, options, defaults or help text shows up here as a
diff, so moving commands between modules is proven not to change what users see.
A deliberate change: regenerate with

    PYTHONPATH=platform python tests/unit/test_cli_surface.py

and commit the snapshot with the change that explains it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.testing import CliRunner

SNAPSHOT = Path(__file__).with_name("cli_help_snapshot.txt")
WIDTH = 100  # fixed, so the terminal running the tests does not change the wrapping


def _paths(command: click.Command, path: tuple[str, ...], ctx: click.Context) -> list[tuple[str, ...]]:
    found = [path]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, name
            found += _paths(sub, (*path, name), click.Context(sub, info_name=name, parent=ctx))
    return found


def cli_help_text() -> str:
    """`medserve [SUBCOMMAND ...] --help` for the root and every (nested) command, in one text."""
    from medserve.cli.main import cli

    runner = CliRunner(env={"COLUMNS": str(WIDTH)})
    sections = []
    for path in _paths(cli, (), click.Context(cli, info_name="medserve")):
        result = runner.invoke(cli, [*path, "--help"], prog_name="medserve", terminal_width=WIDTH,
                               max_content_width=WIDTH)
        assert result.exit_code == 0, (path, result.output)
        sections.append(f"=== medserve {' '.join((*path, '--help'))}\n{result.output}")
    return "".join(sections)


def test_cli_help_matches_snapshot():
    assert SNAPSHOT.exists(), "no snapshot: run this file as a script to write it"
    expected, actual = SNAPSHOT.read_text(), cli_help_text()
    if actual != expected:
        import difflib

        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            "cli_help_snapshot.txt", "current CLI"))
        raise AssertionError(f"the CLI's help changed; if on purpose, regenerate the snapshot:\n{diff}")


def test_snapshot_covers_every_command():
    text = SNAPSHOT.read_text()
    for needle in ("=== medserve --help", "=== medserve keys create --help", "=== medserve models approve --help",
                   "=== medserve cluster join --help", "=== medserve artifact hash --help"):
        assert needle in text


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))
    SNAPSHOT.write_text(cli_help_text())
    print(f"wrote {SNAPSHOT}")
