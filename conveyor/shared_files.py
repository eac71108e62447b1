"""Reads of the files a v3.0 session shares between its episodes, apart from the source that indexes them:
whether a parquet's writer has closed it, and one episode's span of a multi-episode mp4 (probed, its packets
demuxed, keyframes sampled). Validation probes spans with these too, without opening a source.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from conveyor.errors import ConveyorError

PARQUET_MAGIC = b"PAR1"


def parquet_closed(path: str | Path) -> bool:
    """The file ends with parquet's magic, i.e. its writer wrote the footer and closed it (a stat and 4
    bytes: no pyarrow). A file whose footer is missing is still being written (or was left by a killed
    writer) and is not read."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 12:
                return False
            f.seek(size - 4)
            return f.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def probe_span(path: Path, span: tuple[float, float], fps: int, sample: int = 0, packets: list | None = None):
    """`conveyor.video.probe` for one episode's span `[from, to)` of a multi-episode mp4: demux (seek to the
    keyframe before it, stop after it) the packets presented in the span, within half a frame (lerobot sums
    float durations, upstream #3177). The span must start with a keyframe, or it cannot be stream-copied.
    With `sample=k` returns `(probe, frames)` like `probe`."""
    import av

    from conveyor.video import VideoProbe, _open, decode_sampled_keyframes, frame_ticks

    half = 0.5 / fps
    lo, hi = span[0] - half, span[1] - half
    with _open(path) as c:
        if not c.streams.video:
            raise ConveyorError(path, "no video stream")
        s = c.streams.video[0]
        tb = Fraction(s.time_base.numerator, s.time_base.denominator)
        got: list = []
        try:
            for attempt in (0, 1):
                got.clear()
                if attempt == 0 and lo > 0:
                    c.seek(int(lo / tb), stream=s, backward=True, any_frame=False)
                elif attempt == 1:
                    c.seek(0, stream=s, backward=True, any_frame=False)
                first = None
                for pk in c.demux(s):
                    if pk.size == 0 or pk.pts is None:
                        continue
                    t = float(pk.pts * tb)
                    if first is None:
                        first = t
                    if t < lo:
                        continue
                    if t >= hi:
                        break
                    got.append(pk)
                if attempt == 1 or lo <= 0 or (first is not None and first <= lo + 1e-9):
                    break  # the seek landed at or before the span: nothing of it was skipped
        except av.error.FFmpegError as e:
            raise ConveyorError(path, f"truncated or corrupt video: {e}") from None
        if not got:
            raise ConveyorError(path, f"no frames in [{span[0]:.6f}, {span[1]:.6f})")
        if not got[0].is_keyframe:
            raise ConveyorError(path, f"span [{span[0]:.6f}, {span[1]:.6f}) does not start at a keyframe: it "
                                      "cannot be stream-copied")
        pts = [pk.pts for pk in got]
        rate = s.average_rate or s.guessed_rate
        ticks = frame_ticks(rate, tb) if rate else max(pk.duration or 0 for pk in got) or 1
        keyframes = {pk.pts: pk for pk in got if pk.is_keyframe}
        pr = VideoProbe(len(got), tuple(sorted(pts)), tb, s.codec_context.name, s.codec_context.width,
                        s.codec_context.height, ticks, frozenset(keyframes),
                        min(pk.dts if pk.dts is not None else pk.pts for pk in got))
        if packets is not None:
            packets.extend(got)
        if not sample:
            return pr, []
        return pr, decode_sampled_keyframes(path, s.codec_context, pr, keyframes, sample)
