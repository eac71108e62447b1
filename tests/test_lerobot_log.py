"""lerobot-train's config dump, read from its log lines (conveyor/training/lerobot_log.py), without Prefect."""
from __future__ import annotations

import enum
from pathlib import PosixPath
from pprint import pformat

from conveyor.training.lerobot_log import ConfigDump


class Mode(enum.Enum):
    MEAN_STD = "MEAN_STD"


def feed(lines, on_config):
    seen: list[str] = []
    dump = ConfigDump(seen.append, on_config)
    for ln in lines:
        dump(ln)
    return seen


def test_the_dump_becomes_rows_and_every_other_line_passes():
    cfg = {"batch_size": 8, "policy": {"type": "act", "normalization_mapping": {"VISUAL": Mode.MEAN_STD}},
           "dataset": {"root": PosixPath("/data/stores/koch")}, "steps": 5}
    dump = pformat(cfg, width=40).splitlines()
    assert len(dump) > 3
    rows: list[dict] = []
    seen = feed(["INFO 2026-11-25 21:00:00 ils.py:100 starting", f"INFO 2026-11-25 21:00:01 ain.py:272 {dump[0]}",
                 *dump[1:], "WARNING 2026-11-25 21:00:03 ain.py:301 {'not': 'closed'",
                 "INFO 2026-11-25 21:00:04 ain.py:9 end"], lambda r: (rows.extend(r), "CONFIG")[1])
    assert seen == ["INFO 2026-11-25 21:00:00 ils.py:100 starting", "CONFIG",
                    "WARNING 2026-11-25 21:00:03 ain.py:301 {'not': 'closed'", "INFO 2026-11-25 21:00:04 ain.py:9 end"]
    assert {r["option"]: r["value"] for r in rows} == {
        "batch_size": "8", "policy.type": "'act'", "policy.normalization_mapping.VISUAL": "'MEAN_STD'",
        "dataset.root": "'/data/stores/koch'", "steps": "5"}


def test_a_failing_display_gives_the_lines_back():
    line = "INFO 2026-11-25 21:00:01 ain.py:272 {'a': 1}"

    def broken(rows):
        raise RuntimeError("no server")

    assert feed([line, "next"], broken) == [line, "next"]
