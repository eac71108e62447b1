"""A source's declared camera streams against its files: info.json's shape, fps, codec and pix_fmt for each
camera, compared with the first video stream's header (no packets read).

Checked once per ingest, on the first complete readable episode, before anything is written: the store copies
the declared shape into its own info.json, and lerobot and the policy trust it over the pixels.
"""
from __future__ import annotations

from pathlib import Path

from conveyor.errors import ConveyorError


def check_declared_cameras(root: Path, features: dict, videos: dict[str, Path]) -> bool:
    """Refuse a source whose info.json declares camera streams its files do not have (one line, the camera).

    `videos` are one episode's files by camera key (the first complete one), `features` the source's
    info.json features, `root` the source folder. False when one of the videos does not open (a broken
    episode: ingest quarantines it).
    """
    headers = {key: stream_header(path) for key, path in videos.items()}
    if any(h is None for h in headers.values()):
        return False
    for key, path in videos.items():
        declared = declared_stream(features[key])
        actual = headers[key]
        wrong = [f"{what} {declared[what]:g} declared, {actual[what]:g} in the file" if what == "fps"
                 else f"{what} {declared[what]} declared, {actual[what]} in the file"
                 for what in ("height", "width", "fps", "pix_fmt") if what in declared and actual[what] is not None
                 and (abs(declared[what] - actual[what]) > 0.01 if what == "fps" else declared[what] != actual[what])]
        if "codec" in declared and not same_codec(declared["codec"], actual["codec"]):
            wrong.append(f"codec {declared['codec']} declared, {actual['codec']} in the file")
        if wrong:
            raise ConveyorError(root / "meta" / "info.json",
                                f"camera {key}: {'; '.join(wrong)} ({path.relative_to(root)})")
    return True


def declared_stream(feature: dict) -> dict:
    """height/width (from `shape` and `names`), fps, codec, pix_fmt as info.json declares them."""
    out: dict = {}
    shape, names = list(feature.get("shape") or []), list(feature.get("names") or [])
    if len(shape) == 3:
        if "height" in names and "width" in names:
            out["height"], out["width"] = int(shape[names.index("height")]), int(shape[names.index("width")])
        else:  # lerobot's default order: height, width, channels
            out["height"], out["width"] = int(shape[0]), int(shape[1])
    info = feature.get("info") or {}
    for key, what in (("video.height", "height"), ("video.width", "width")):
        if key in info and what not in out:
            out[what] = int(info[key])
    fps = info.get("video.fps", feature.get("fps"))
    if fps is not None:
        out["fps"] = float(fps)
    if info.get("video.codec"):
        out["codec"] = str(info["video.codec"])
    if info.get("video.pix_fmt"):
        out["pix_fmt"] = str(info["video.pix_fmt"])
    return out


def stream_header(path: Path) -> dict | None:
    """The first video stream's header (no packets read); None when the file does not open as a video."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                return None
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate
            return {"height": s.codec_context.height, "width": s.codec_context.width,
                    "fps": round(float(rate), 3) if rate else None, "pix_fmt": s.codec_context.pix_fmt,
                    "codec": s.codec_context.name, "codec_id": s.codec_context.codec.id}
    except (av.error.FFmpegError, OSError):
        return None


def same_codec(declared: str, actual: str) -> bool:
    """`av1` declared and decoded by libdav1d is the same codec: compare FFmpeg codec ids."""
    import av

    if declared == actual:
        return True
    try:
        return av.Codec(declared, "r").id == av.Codec(actual, "r").id
    except Exception:  # noqa: BLE001 - an encoder-only or unknown name: compare as text
        return False
