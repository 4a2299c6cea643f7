"""Every command's `--help`, in one text: `python -m tests.help_snapshot > tests/data/help.txt` records it.

The reshaping of the package into folders promised no behaviour change; `test_help_unchanged` holds
the recorded text against the commands as they are now.
"""
from __future__ import annotations

import click

from migrator.cli import build


def walk(command: click.Command, path: list[str]):
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from walk(command.commands[name], path + [name])


def snapshot() -> str:
    root = build()
    out = []
    for path, command in walk(root, ["migrate"]):
        with click.Context(command, info_name=" ".join(path), terminal_width=100, max_content_width=100) as ctx:
            out.append(f"=== {' '.join(path)}\n{command.get_help(ctx)}\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(snapshot(), end="")
