"""`conveyor salvage SESSION OUT`: a killed lerobot 0.6.1 recording session's recoverable episodes as a new
v3.0 dataset folder (see conveyor/salvage.py for what is recoverable and what is not)."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("salvage", help="rebuild the complete episodes of a killed lerobot 0.6.1 recording "
                                       "session into a new v3.0 dataset folder OUT (the session is only read)")
    p.add_argument("session", metavar="SESSION", help="the session's dataset folder (the recorder's root)")
    p.add_argument("out", metavar="OUT", help="new dataset folder to write (must not exist, or be empty)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_salvage)


def _salvage(args: argparse.Namespace) -> int:
    from conveyor.salvage_out import salvage

    report = salvage(args.session, args.out)
    if args.json:
        print(json.dumps({"out": str(report.out),
                          "recovered": [{"session_episode": a, "episode": b, "frames": n}
                                        for a, b, n in report.recovered],
                          "quarantined": {str(k): v for k, v in sorted(report.quarantined.items())},
                          "notes": report.notes}, ensure_ascii=False, indent=2))
    else:
        print("\n".join(report.lines()))
    return 0
