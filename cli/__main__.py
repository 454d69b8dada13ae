"""`python -m cli` is the same as the `rlhf` console script."""

from cli.main import app

app()
