"""Commands added by the report work (see cli/main.py)."""

from cli.main import app  # noqa: F401
