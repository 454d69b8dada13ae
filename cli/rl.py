"""Commands added by the rl work (see cli/main.py)."""

from cli.main import app  # noqa: F401
