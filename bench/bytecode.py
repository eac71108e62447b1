"""Compile conveyor's own modules to bytecode before timing a command.

pip compiles an installed package's modules at install time, and lerobot's (the baselines) are compiled in
site-packages. conveyor is installed editable, and this machine sets PYTHONDONTWRITEBYTECODE=1, so without
this step every timed conveyor process would compile its ~40 modules from source again (~40 ms)."""
from __future__ import annotations

import compileall
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTE = ("conveyor's modules are compiled to bytecode first, as pip does for an installed package "
        "(this machine sets PYTHONDONTWRITEBYTECODE=1; lerobot's are compiled in site-packages)")


def compile_conveyor() -> None:
    for package in ("conveyor", "flows", "tasks"):
        compileall.compile_dir(REPO / package, quiet=1)
