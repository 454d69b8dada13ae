"""`python -m cli` is the same as the `rlhf` console script (and names itself so in help and errors)."""

from cli.main import app

app(prog_name="rlhf")
