"""What a STORE argument names, and which store names are allowed: one rule for every command, flow and the
training request.

The rule:
1. A spec with a `/` in it (or `.`, `..`, `~...`) is a path: that folder, relative to the working folder.
   `./lab` names the folder `lab` here.
2. Anything else is a store *name* (checked by `check_name`): the store `<store_root>/<name>`.
   - A command that creates a store (ingest, convert) creates it there.
   - Where no store of that name is under store_root, a folder of that name in the working folder is taken
     instead (so `conveyor validate rec` can say that ./rec is a recording, and an old store here still opens).
   - Neither: the name is refused, naming the known stores and the nearest one.
3. Neither a name nor a path may be store_root itself or lie inside conveyor's own `.conveyor/` folders.

Store names (also source names, which name their store, backup targets and published datasets): letters of
any script (Chinese too), digits, `.`, `_` and `-`; not starting with `.` or `-`; at most 100 characters. So
no spaces, no `:` (`con:`), no hidden or bookkeeping folders (`.conveyor`), no empty or whitespace-only name.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

from conveyor.errors import ConveyorError
from conveyor.layout import DOT

NAME_RULE = ("letters (any script), digits, '.', '_' and '-', not starting with '.' or '-', "
             "at most 100 characters")
MAX_NAME = 100


def name_problem(name: str) -> str | None:
    """Why `name` is not an allowed store name, or None when it is."""
    if not name or not name.strip():
        return "an empty name" if not name else "only whitespace"
    if len(name) > MAX_NAME:
        return f"{len(name)} characters"
    if name[0] in ".-":
        return f"it starts with {name[0]!r}"
    bad = sorted({c for c in name if not (c.isalnum() or c in "._-")})
    if bad:
        return "it contains " + ", ".join(repr(c) for c in bad)
    return None


def check_name(name: str, what: str = "store") -> str:
    """`name` when it is an allowed store name; else one line saying what is allowed."""
    why = name_problem(name)
    if why:
        raise ConveyorError(name if name.strip() else repr(name),
                            f"not a valid {what} name ({why}): use {NAME_RULE}")
    return name


def is_path(spec: str | Path) -> bool:
    """Rule 1: a Path object, or text with a `/`, or `.`, `..`, `~...`."""
    if isinstance(spec, Path):
        return True
    return "/" in spec or os.sep in spec or spec in (".", "..") or spec.startswith("~")


def known_stores(store_root: Path) -> list[str]:
    """The stores under store_root, by name."""
    try:
        return sorted(p.name for p in Path(store_root).iterdir() if (p / DOT).is_dir())
    except OSError:
        return []


def unknown_store(name: str, store_root: Path) -> ConveyorError:
    """`no store named X under ROOT; known stores: a, b (nearest: a)`."""
    known = known_stores(store_root)
    text = f"no store named `{name}` under {store_root}"
    if not known:
        return ConveyorError(name, text + "; there are no stores there yet (`conveyor stores` lists them)")
    nearest = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    text += f"; known stores: {', '.join(known[:12])}" + (f" and {len(known) - 12} more" if len(known) > 12 else "")
    return ConveyorError(name, text + (f" (nearest: {nearest[0]})" if nearest else ""))


def _root(store_root: Path | Callable[[], Path]) -> Path:
    return Path(store_root() if callable(store_root) else store_root)


def _checked(path: Path, store_root: Path | Callable[[], Path], spec: str | Path) -> Path:
    """Rule 3: never inside a `.conveyor/` folder, never store_root itself (a store here is never store_root:
    store_root, which may cost loading the settings, is then not looked at)."""
    p = path.expanduser()
    if DOT in p.absolute().parts:
        raise ConveyorError(spec, f"inside conveyor's own {DOT}/ folder: name a store, not its bookkeeping")
    if not (p / DOT).is_dir():
        root = _root(store_root).expanduser().absolute()
        if os.path.normpath(p.absolute()) == os.path.normpath(root):
            raise ConveyorError(spec, f"this is store_root itself ({root}), which holds stores: name one of them")
    return p


def find_store(spec: str | Path, store_root: Path | Callable[[], Path]) -> Path | None:
    """The existing folder `spec` names by the rule, or None (no error): the training request's lookup, where a
    worker without the store fetches a published version instead."""
    if is_path(spec):
        p = Path(spec).expanduser()
        return _checked(p, store_root, spec) if p.is_dir() else None
    if name_problem(spec):
        return None
    for p in (_root(store_root) / spec, Path(spec)):
        if p.is_dir():
            return _checked(p, store_root, spec)
    return None


def resolve_store(spec: str | Path, store_root: Path | Callable[[], Path], *, new: bool = False) -> Path:
    """The folder a STORE argument names, by the module's rule. `new`: the command creates the store when
    missing (a name then means `<store_root>/<name>`). A bare name that is no store under store_root but a
    folder here is returned as that folder, for the command to open or to say what it is. `store_root` may be
    a function returning it: a path to a store then needs no settings (the nothing-new ingest's fast path)."""
    if is_path(spec):
        return _checked(Path(spec), store_root, spec)
    root = _root(store_root)
    named = root / check_name(spec)
    if new or named.is_dir():
        return _checked(named, root, spec)
    here = Path(spec)
    if here.is_dir():
        return _checked(here, root, spec)
    raise unknown_store(spec, root)
