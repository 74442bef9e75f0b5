"""`python -m advcli`: the same command as `advcli` (and what `torchrun -m advcli` starts)."""

from .cli import app

app(prog_name="advcli")
