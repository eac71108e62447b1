"""Episode review sheets: see each episode (camera thumbnails, a state/action plot, length, task, the commit it
came in) before deciding to drop, trim or re-task it.

One sheet is either a self-contained HTML file (`conveyor review`, pictures as `data:` URIs, so it opens on any
machine) or a markdown artifact (each ingest run's new episodes). Reading only: frames are decoded with PyAV
from the store's own mp4 at the episode's `from_timestamp + i/fps`, rows come from its data file. A sheet's size
is bounded twice: at most `max_episodes` cards and at most `max_bytes` of embedded pictures; what does not fit
is named in a note saying how to ask for the rest.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from conveyor import layout
from conveyor.errors import ConveyorError
from conveyor.reports import md_text

FRAMES = 4  # thumbnails per camera: first, evenly spaced, last
THUMB_WIDTH = 176  # px
HTML_MAX_EPISODES, HTML_MAX_BYTES = 48, 16_000_000
ARTIFACT_MAX_EPISODES, ARTIFACT_MAX_BYTES = 12, 2_000_000
_PLOTTED = ("observation.state", "action")


@dataclass(frozen=True)
class Picture:
    mime: str  # image/jpeg | image/png
    data: bytes
    alt: str

    def uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass
class Card:
    """What a person needs to judge one store episode."""

    episode_index: int
    length: int
    fps: float
    tasks: list[str]
    commit: int | None = None  # the commit the episode came in (ledger)
    committed: datetime | None = None
    source: str | None = None
    source_episode_index: int | None = None
    source_start: int = 0  # first source frame kept (a trimmed episode starts later)
    thumbs: dict[str, list[tuple[int, Picture]]] = field(default_factory=dict)  # camera -> (frame, picture)
    plot: Picture | None = None
    problems: list[str] = field(default_factory=list)  # a camera that would not decode: shown, not fatal

    @property
    def seconds(self) -> float:
        return self.length / self.fps if self.fps else 0.0

    @property
    def picture_bytes(self) -> int:
        """Bytes the card adds to a sheet (base64 text of its pictures)."""
        pics = [p for frames in self.thumbs.values() for _, p in frames] + ([self.plot] if self.plot else [])
        return sum(4 * ((len(p.data) + 2) // 3) for p in pics)


@dataclass
class Sheet:
    name: str
    path: Path
    version: str  # the store's version when the sheet was made (c12-<hash>)
    episodes: int  # in the store
    asked: list[int]
    cards: list[Card]
    max_episodes: int
    max_bytes: int

    @property
    def left_out(self) -> list[int]:
        shown = {c.episode_index for c in self.cards}
        return [e for e in self.asked if e not in shown]

    def note(self) -> str:
        """Why some asked episodes are not on this sheet, and how to see them."""
        rest = self.left_out
        if not rest:
            return ""
        return (f"{len(self.cards)} of {len(self.asked)} episodes shown (a sheet holds at most {self.max_episodes} "
                f"episodes and {self.max_bytes / 1e6:.0f} MB of pictures); the rest: "
                f"`conveyor review {self.name} {spans(rest)}`")


def spans(episodes: list[int]) -> str:
    """`3 7 12-15`: the EPISODES form the curation commands take."""
    out, run = [], []
    for e in sorted(set(episodes)):
        if run and e == run[-1] + 1:
            run.append(e)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [e]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return " ".join(out)


# -- reading -------------------------------------------------------------------------------------------

def review(store: str | Path, episodes: list[int], name: str | None = None, *, frames: int = FRAMES,
           thumb_width: int = THUMB_WIDTH, max_episodes: int = HTML_MAX_EPISODES,
           max_bytes: int = HTML_MAX_BYTES) -> Sheet:
    """Cards for `episodes` of the store, in the order asked, until either bound is reached.

    An episode the store does not have is an error naming the store (nothing is made)."""
    from conveyor.episodes import load_episodes
    from conveyor.inventory import describe
    from conveyor.store import Store

    s = Store.open(store)
    with s.committed_view():
        info = s.info
        rows = {r["episode_index"]: r for r in load_episodes(s.root)}
        missing = [e for e in episodes if e not in rows]
        if missing:
            have = f"episodes 0-{len(rows) - 1}" if rows else "no episodes"
            raise ConveyorError(s.root, f"episode {missing[0]} is not in the store (it has {have})")
        detail = describe(s.root, name)
        when = {v.commit: v.time for v in detail.versions}
        ledger = {r.episode_index: r for r in s.ledger()}
        fps = float(info.get("fps") or 0)
        features = info.get("features") or {}
        sheet = Sheet(name=detail.name, path=s.root, version=detail.version, episodes=len(rows),
                      asked=list(dict.fromkeys(episodes)), cards=[], max_episodes=max_episodes,
                      max_bytes=max_bytes)
        tables: dict[str, object] = {}
        used = 0
        for ep in sheet.asked[:max_episodes]:
            row = rows[ep]
            rel = layout.episode_data_path(row)
            if rel not in tables:
                tables[rel] = _read_data(s.root / rel, features)
            card = _card(s.root, row, tables[rel], features, fps, frames, thumb_width)
            rec = ledger.get(ep)
            if rec is not None:
                card.commit, card.source, card.source_episode_index = rec.commit, rec.source, rec.source_episode_index
                card.source_start = getattr(rec, "start", 0) or 0
                card.committed = when.get(rec.commit)
            if sheet.cards and used + card.picture_bytes > max_bytes:
                break
            used += card.picture_bytes
            sheet.cards.append(card)
    return sheet


def _read_data(path: Path, features: dict):
    import pyarrow.parquet as pq

    wanted = ["episode_index", "frame_index"] + [k for k in _PLOTTED if k in features]
    wanted += [k for k, ft in features.items() if ft["dtype"] == "image"]
    return pq.ParquetFile(path).read(columns=wanted)


def _card(root: Path, row: dict, table, features: dict, fps: float, frames: int, thumb_width: int) -> Card:
    import pyarrow.compute as pc

    from conveyor.video import decode_frames

    ep, n = int(row["episode_index"]), int(row["length"])
    card = Card(episode_index=ep, length=n, fps=fps, tasks=list(row.get("tasks") or []))
    rows = table.filter(pc.equal(table.column("episode_index"), ep))
    picks = sorted({round(i * (n - 1) / max(frames - 1, 1)) for i in range(frames)}) if n else []
    for key, ft in features.items():
        short = key.removeprefix("observation.images.")
        try:
            if ft["dtype"] == "video":
                t0 = row[f"videos/{key}/from_timestamp"]
                images = decode_frames(root / layout.episode_video_path(row, key), [t0 + i / fps for i in picks])
            elif ft["dtype"] == "image":
                from conveyor import stats

                column = rows.column(key).to_pylist()
                images = stats.png_frames([column[i] for i in picks], k=len(picks))
            else:
                continue
        except ConveyorError as e:
            card.problems.append(f"{short}: {e}")
            continue
        card.thumbs[short] = [(i, _thumb(img, thumb_width, f"episode {ep} {short} frame {i}"))
                              for i, img in zip(picks, images)]
    series = {k: _matrix(rows.column(k)) for k in _PLOTTED if k in rows.column_names}
    if any(len(v) for v in series.values()):
        card.plot = _plot(series, fps, ep, features)
    return card


def _matrix(column) -> np.ndarray:
    import pyarrow.compute as pc

    col = column.combine_chunks()
    if len(col) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.asarray(pc.list_flatten(col).to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), -1)


def _thumb(rgb: np.ndarray, width: int, alt: str) -> Picture:
    from PIL import Image

    img = Image.fromarray(rgb)
    if img.width > width:
        img = img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return Picture("image/jpeg", buf.getvalue(), alt)


def _plot(series: dict[str, np.ndarray], fps: float, ep: int, features: dict) -> Picture:
    """observation.state (top) and action (bottom) against seconds; one colour per joint in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 1, figsize=(4.4, 1.2 * len(series) + 0.4), dpi=100, sharex=True,
                             squeeze=False)
    for ax, (key, values) in zip(axes[:, 0], series.items()):
        t = np.arange(len(values)) / (fps or 1)
        names = (features.get(key) or {}).get("names") or []
        for j in range(values.shape[1] if values.ndim == 2 else 0):
            ax.plot(t, values[:, j], linewidth=1.0, color=plt.cm.tab10(j % 10),
                    label=names[j] if j < len(names) else f"{j}")
        ax.set_title(key.split(".")[-1], fontsize=8, loc="left", pad=2)
        ax.tick_params(labelsize=7, length=2)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds", fontsize=7, labelpad=1)
    fig.tight_layout(pad=0.3, h_pad=0.2)
    fig.canvas.draw()
    from PIL import Image

    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    buf = io.BytesIO()  # a 64-colour palette: a fifth of the bytes of matplotlib's RGBA PNG, same look
    rgb.quantize(64, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    return Picture("image/png", buf.getvalue(), f"episode {ep}: state and action over time")


# -- rendering ------------------------------------------------------------------------------------------

def _when(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M") if t else ""


def _task_text(card: Card) -> str:
    return " | ".join(card.tasks) if card.tasks else "(no task)"


def _came_in(card: Card) -> str:
    if card.commit is None:
        return "not in the ledger"
    when = _when(card.committed)
    return f"c{card.commit}" + (f" ({when})" if when else "")


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f3f4f6;color:#111827}
header{padding:18px 28px;background:#1f2937;color:#f9fafb}
header h1{margin:0 0 4px;font-size:20px} header p{margin:2px 0;color:#d1d5db}
code{font:12px ui-monospace,Menlo,monospace;background:#e5e7eb;color:#111827;padding:1px 4px;border-radius:3px}
header code{background:#374151;color:#f9fafb}
.note{margin:14px 28px 0;padding:10px 14px;background:#fef3c7;border:1px solid #f59e0b;border-radius:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:16px;padding:18px 28px}
.card{background:#fff;border:1px solid #d1d5db;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px #0001}
.head{display:flex;align-items:baseline;gap:10px;margin-bottom:6px}
.ep{font-size:28px;font-weight:700;color:#1d4ed8;min-width:48px}
.meta{color:#374151;font-size:13px} .task{font-weight:600;margin:2px 0 8px;color:#111827}
.cam{font-size:12px;color:#6b7280;margin:6px 0 2px} .strip{display:grid;gap:4px}
.strip figure{margin:0;text-align:center} .strip figcaption{font-size:10px;color:#9ca3af}
.strip img{display:block;border-radius:3px;width:100%} .plot{margin-top:8px;width:100%;max-width:440px;display:block}
.problem{color:#b91c1c;font-size:12px} .cmd{margin-top:8px;font-size:11px;color:#6b7280}
"""


def html_sheet(sheet: Sheet) -> str:
    """One self-contained page: a card per episode, the store episode number large (it is what the curation
    commands take)."""
    e = html.escape
    title = f"{sheet.name}: review of {len(sheet.cards)} episode(s)"
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body><header><h1>{e(sheet.name)} &middot; "
             f"{len(sheet.cards)} episode(s) for review</h1>"
             f"<p>store <code>{e(str(sheet.path))}</code> at version <code>{e(sheet.version)}</code>, "
             f"{sheet.episodes} episodes</p><p>Take one out with <code>conveyor drop {e(sheet.name)} N "
             f"--reason TEXT</code>; fix its task with <code>conveyor retask {e(sheet.name)} N --task TEXT"
             f"</code>.</p></header>"]
    if sheet.note():
        parts.append(f"<div class=note>{_code(e(sheet.note()))}</div>")
    parts.append("<main class=grid>")
    for c in sheet.cards:
        src = (f" &middot; source episode {c.source_episode_index} of <code>{e(Path(c.source).name)}</code>"
               if c.source else "")
        if c.source_start:
            src += f" (trimmed: source frames {c.source_start}-{c.source_start + c.length - 1})"
        parts.append(f"<section class=card id=ep-{c.episode_index} data-episode={c.episode_index}>"
                     f"<div class=head><span class=ep title=\"store episode\">{c.episode_index}</span>"
                     f"<span class=meta>{c.length} frames, "
                     f"{c.seconds:.1f} s &middot; came in {e(_came_in(c))}{src}</span></div>"
                     f"<div class=task>{e(_task_text(c))}</div>")
        for cam, thumbs in c.thumbs.items():
            parts.append(f"<div class=cam>{e(cam)}</div><div class=strip "
                         f"style=\"grid-template-columns:repeat({len(thumbs)},1fr)\">")
            parts += [f"<figure><img src=\"{p.uri()}\" alt=\"{e(p.alt)}\"><figcaption>frame {i}</figcaption>"
                      f"</figure>" for i, p in thumbs]
            parts.append("</div>")
        parts += [f"<div class=problem>{e(p)}</div>" for p in c.problems]
        if c.plot:
            parts.append(f"<img class=plot src=\"{c.plot.uri()}\" alt=\"{e(c.plot.alt)}\">")
        parts.append(f"<div class=cmd><code>conveyor drop {e(sheet.name)} {c.episode_index} --reason ...</code>"
                     f"</div></section>")
    parts.append("</main></body></html>\n")
    return "".join(parts)


def _code(escaped: str) -> str:
    """`...` spans of an (escaped) note as <code>."""
    out = escaped.split("`")
    return "".join(f"<code>{t}</code>" if i % 2 else t for i, t in enumerate(out))


def markdown_sheet(sheet: Sheet) -> str:
    """The same sheet as markdown (Prefect artifacts render `data:image/` sources): per episode a heading with its
    store number, a contact sheet of its cameras (a row of frames per camera) and the plot, one under the other
    (the UI shows each image as a block)."""
    lines = [f"# Review: {len(sheet.cards)} episode(s) of `{sheet.name}`", "",
             f"Store at version `{sheet.version}`, {sheet.episodes} episodes. Take a bad one out with "
             f"`conveyor drop {sheet.name} N --reason TEXT` (or the `curate` deployment).", ""]
    if sheet.note():
        lines += [f"> {sheet.note()}", ""]
    for c in sheet.cards:
        frames = ", ".join(str(i) for i, _ in next(iter(c.thumbs.values()), []))
        lines += [f"### Episode {c.episode_index} · {c.length} frames, {c.seconds:.1f} s · came in {_came_in(c)}",
                  "", f"Task: {md_text(_task_text(c))} · {', '.join(c.thumbs) or 'no camera'} at frames {frames or '-'}"
                  + (f" · trimmed: source frames {c.source_start}-{c.source_start + c.length - 1}"
                     if c.source_start else ""), ""]
        lines += [f"**{md_text(p)}**" for p in c.problems] + ([""] if c.problems else [])
        pics = [contact_sheet(c), c.plot]
        lines += [f"![{p.alt}]({p.uri()})\n" for p in pics if p is not None]
    return "\n".join(lines) + "\n"


def contact_sheet(card: Card, gap: int = 2) -> Picture | None:
    """A card's thumbnails in one JPEG: a row of frames per camera."""
    from PIL import Image

    rows = [[Image.open(io.BytesIO(p.data)).convert("RGB") for _, p in thumbs] for thumbs in card.thumbs.values()]
    rows = [r for r in rows if r]
    if not rows:
        return None
    width = max(sum(im.width for im in r) + gap * (len(r) - 1) for r in rows)
    height = sum(max(im.height for im in r) for r in rows) + gap * (len(rows) - 1)
    out = Image.new("RGB", (width, height), "white")
    y = 0
    for r in rows:
        x = 0
        for im in r:
            out.paste(im, (x, y))
            x += im.width + gap
        y += max(im.height for im in r) + gap
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=80)
    return Picture("image/jpeg", buf.getvalue(), f"episode {card.episode_index}: {', '.join(card.thumbs)}")


