"""lerobot-train's log, read: its config dump (pformat of the train config, ~120 lines) recognised among the
output lines and parsed into `option = value` rows. The metric lines are parsed by lerobot_train.parse_metrics;
the Prefect layer (tasks/views.py) turns the rows into an artifact."""
from __future__ import annotations

import ast
import re
from collections.abc import Callable

NEW_RECORD = re.compile(r"^(?:\x1b\[[0-9;]*m)*(?:INFO|DEBUG|WARNING|ERROR|CRITICAL) .*\d{4}-\d\d-\d\d \d\d:")
LOG_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)*(?:INFO|DEBUG|WARNING)\b.*?\s(\{'.*)$")


class ConfigDump:
    """Passes lerobot-train's output lines on, except its config dump (one `pformat(cfg.to_dict())` of
    ~120 lines), which is handed to `on_config` as `option = value` rows instead; the line `on_config` returns
    is passed on in its place (if it raises, the dump's first line is: a display never stops training)."""

    MAX_LINES = 1000

    def __init__(self, on_line: Callable[[str], None], on_config: Callable[[list[dict]], str]):
        self.on_line, self.on_config = on_line, on_config
        self.lines: list[str] | None = None
        self.head = ""
        self.published = False

    def __call__(self, line: str) -> None:
        if self.lines is not None and (NEW_RECORD.match(line) or len(self.lines) > self.MAX_LINES):
            self._give_back()  # a new log record before the dump parsed: it was not one
        if self.lines is None:
            m = None if self.published else LOG_PREFIX.match(line)
            if not m:
                self.on_line(line)
                return
            self.head, self.lines = line, [m.group(1)]
        else:
            self.lines.append(line)
        try:
            cfg = ast.literal_eval(_literal("\n".join(self.lines)))
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            return
        self.lines = None
        if not isinstance(cfg, dict):
            self.on_line(self.head)
            return
        self.published = True
        rows = [{"option": k, "value": v} for k, v in _flatten(cfg)]
        try:
            said = self.on_config(rows)
        except Exception:  # noqa: BLE001 - a display must never stop training
            said = self.head
        self.on_line(said)

    def _give_back(self) -> None:
        lines, self.lines = self.lines or [], None
        if lines:
            self.on_line(self.head)
            for ln in lines[1:]:
                self.on_line(ln)


def _literal(text: str) -> str:
    """pformat output as a Python literal: enum members (`<NormalizationMode.MEAN_STD: 'MEAN_STD'>`) become
    their value, paths (`PosixPath('/x')`) their text, other `<...>` reprs a string."""
    text = re.sub(r"<[A-Za-z_][\w.]*: ('[^'<>]*'|\"[^\"<>]*\"|[^<>'\"]*)>",
                  lambda m: m.group(1) if m.group(1)[:1] in "'\"" else repr(m.group(1)), text)
    text = re.sub(r"\b\w*Path\(('[^']*'|\"[^\"]*\")\)", r"\1", text)
    return re.sub(r"<[^<>'\"\n]*>", lambda m: repr(m.group(0)), text)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += _flatten(v, key + ".")
        else:
            out.append((key, repr(v) if isinstance(v, str) else str(v)))
    return out
