"""`conveyor convert | ingest | validate | compact`: the store commands."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the store subcommands (filled in by the core store work)."""
