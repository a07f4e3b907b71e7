"""The `mnv4-deploy` command line (`main`), one module per command."""
from __future__ import annotations

from .main import build_parser, description, main

__all__ = ["build_parser", "description", "main"]
