"""`conveyor review STORE EPISODES`: an HTML review sheet (thumbnails, state/action plot, task, the commit each
episode came in) to look at before `conveyor drop`/`trim`/`retask`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conveyor.errors import ConveyorError


def register(sub: argparse._SubParsersAction) -> None:
    """Add `review` to the `conveyor` parser."""
    from conveyor.review import FRAMES, HTML_MAX_BYTES, HTML_MAX_EPISODES

    p = sub.add_parser(
        "review", help="write an HTML review sheet of episodes: camera thumbnails, state/action plot, task",
        description=f"One self-contained HTML file (pictures inside it) with a card per episode: a few frames of "
                    f"each camera, observation.state and action over time, length, task and the commit the "
                    f"episode came in. At most {HTML_MAX_EPISODES} episodes and {HTML_MAX_BYTES // 1_000_000} MB "
                    f"of pictures per sheet; the sheet names the episodes left out.")
    p.add_argument("store", metavar="STORE", help="store name (folder under store_root) or store folder")
    p.add_argument("episodes", metavar="EPISODES", nargs="+",
                   help="store episode indices and ranges, as `conveyor show` numbers them: 3 7 12-15")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="where to write the sheet (default: ./review-<store>-<episodes>.html)")
    p.add_argument("--frames", type=int, default=FRAMES, metavar="N", help="thumbnails per camera")
    p.set_defaults(handler=_review)


def _review(args: argparse.Namespace) -> int:
    from conveyor.cli.store import resolve_store
    from conveyor.curate import parse_episodes
    from conveyor.fileio import write_atomic
    from conveyor.review import html_sheet, review, spans

    try:
        episodes = parse_episodes(args.episodes)
    except ValueError as e:
        print(f"conveyor review: error: {e}", file=sys.stderr)
        return 2
    if args.frames < 1:
        print("conveyor review: error: --frames must be at least 1", file=sys.stderr)
        return 2
    path = resolve_store(args, args.store)
    sheet = review(path, episodes, frames=args.frames)
    tag = spans(episodes).replace(" ", "_")
    out = Path(args.output) if args.output else Path(f"review-{sheet.name}-{tag[:40]}.html")
    if out.is_dir():
        raise ConveyorError(out, "is a folder; give a file name for the sheet")
    write_atomic(out, html_sheet(sheet).encode("utf-8"))
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB): {len(sheet.cards)} episode(s) of {sheet.name} at "
          f"{sheet.version}")
    if sheet.left_out:
        print(sheet.note().replace("`", ""))
    return 0
