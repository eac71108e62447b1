"""Replace one `## <name>` section of bench/README.md; each benchmark owns its own section."""
from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def write_section(section: str, text: str) -> None:
    body = README.read_text(encoding="utf-8") if README.exists() else "# bench\n"
    lines = body.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip() == section), None)
    if start is None:
        new = body.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    README.write_text(new.rstrip("\n") + "\n", encoding="utf-8")
