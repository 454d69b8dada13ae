"""Commands added by the feedback work (see cli/main.py)."""

from cli.main import app  # noqa: F401
