"""docs/cli.md's option tables, generated from the commands themselves (and so, for `fit`, from
the config dataclasses): ``python -m advcli.clidoc docs/cli.md`` rewrites every block between
``<!-- options: COMMAND -->`` and ``<!-- end options -->``; a test checks the file is current."""

from __future__ import annotations

import re
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- options: (?P<name>[a-z ]+) -->\n)(.*?)(<!-- end options -->)", re.S)


def _command(name: str):
    import typer

    from .cli import app

    command = typer.main.get_command(app)
    for part in name.split():
        command = command.commands[part]
    return command


def _table(name: str) -> str:
    """One markdown table per help panel of the command's options."""
    from typer.core import TyperOption

    panels: dict[str, list[str]] = {}
    for param in _command(name).params:
        if not isinstance(param, TyperOption) or param.name == "help":
            continue
        flags = " / ".join(f"`{o}`" for o in param.opts + param.secondary_opts)
        text = (param.help or "").replace("\\[", "[").replace("|", "\\|")
        if "[default:" not in text and param.default not in (None, False, ()) \
                and not param.required:
            text += f" [default: {param.default}]"
        if param.required:
            text += " (required)"
        panel = getattr(param, "rich_help_panel", None) or "Options"
        panels.setdefault(panel, []).append(f"| {flags} | {text} |")
    out = []
    for panel, rows in panels.items():
        out += [f"**{panel}**", "", "| option | meaning |", "|---|---|", *rows, ""]
    return "\n".join(out)


def render(text: str) -> str:
    """``text`` with every generated block rewritten."""
    return BLOCK.sub(lambda m: m.group(1) + _table(m.group("name")) + m.group(4), text)


if __name__ == "__main__":  # pragma: no cover
    path = Path(sys.argv[1])
    path.write_text(render(path.read_text()))
