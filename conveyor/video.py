"""PyAV helpers: packet-level probing, stream-copy concatenation, and frame sampling.

Concatenation is written here rather than with lerobot's `concatenate_video_files` because conveyor
needs each episode's start taken from the real packet timestamps of the output file (lerobot sums float
durations, upstream issue #3177) and must not import torch on the conversion path.
"""
from __future__ import annotations

import bisect
import contextlib
import os
import threading
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import av
import numpy as np

from conveyor.errors import ConveyorError

os.environ.setdefault("SVT_LOG", "1")


@dataclass(frozen=True)
class VideoProbe:
    """What a container says without decoding pixels."""

    frames: int
    pts: tuple[int, ...]  # presentation timestamps, sorted, in time_base units
    time_base: Fraction
    codec: str
    width: int
    height: int
    frame_ticks: int  # duration of one frame in time_base units
    keyframes: frozenset[int] = frozenset()  # pts of packets flagged as keyframes
    first_dts: int = 0  # lowest decode timestamp (below the first pts when B-frames are present)

    def times(self) -> list[float]:
        return [float(p * self.time_base) for p in self.pts]

    @cached_property
    def sorted_keyframes(self) -> tuple[int, ...]:
        """`keyframes` sorted once, so picking one episode's keyframes in a file of many is a bisection."""
        return tuple(sorted(self.keyframes))


def frame_ticks(rate, time_base: Fraction) -> int:
    """One frame's duration in `time_base` units, for a frame rate (a PyAV Fraction)."""
    return int(round(1 / (Fraction(rate.numerator, rate.denominator) * time_base)))


def _open(path: Path):
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise ConveyorError(path, f"cannot open video: {e}") from None


def probe(path: str | Path, sample: int = 0, packets: list[av.Packet] | None = None
          ) -> VideoProbe | tuple[VideoProbe, list[np.ndarray]]:
    """Demux (no decode) the first video stream; a truncated or undecodable file raises ConveyorError.

    With `sample=k`, also decode the k keyframes `pick_keyframes` chooses for the whole file in the same
    pass (only those packets are decoded) and return `(probe, frames)`. `packets`: a list to fill with every
    packet in file order, so `StreamCopy.add` can copy them without demuxing the file again.
    """
    path = Path(path)
    with _open(path) as c:
        if not c.streams.video:
            raise ConveyorError(path, "no video stream")
        s = c.streams.video[0]
        pts: list[int] = []
        dts: list[int] = []
        durations: list[int] = []
        keyframes: dict[int, av.Packet | None] = {}  # packets kept only when sampling (one episode's file)
        try:
            for pk in c.demux(s):
                if pk.size == 0 or pk.pts is None:
                    continue
                pts.append(pk.pts)
                dts.append(pk.dts if pk.dts is not None else pk.pts)
                durations.append(pk.duration or 0)
                if pk.is_keyframe:
                    keyframes[pk.pts] = pk if sample else None
                if packets is not None:
                    packets.append(pk)
        except av.error.FFmpegError as e:
            raise ConveyorError(path, f"truncated or corrupt video: {e}") from None
        if not pts:
            raise ConveyorError(path, "video has no frames (truncated?)")
        tb = Fraction(s.time_base.numerator, s.time_base.denominator)
        rate = s.average_rate or s.guessed_rate
        ticks = frame_ticks(rate, tb) if rate else max(durations) or 1
        pr = VideoProbe(len(pts), tuple(sorted(pts)), tb, s.codec_context.name, s.codec_context.width,
                        s.codec_context.height, ticks, frozenset(keyframes), min(dts))
        if not sample:
            return pr
        return pr, decode_sampled_keyframes(path, s.codec_context, pr, keyframes, sample)


_DECODERS_PER_THREAD = 4
_decoders = threading.local()


def decode_sampled_keyframes(path: Path, stream_ctx, pr: VideoProbe, keyframes: dict, sample: int
                             ) -> list[np.ndarray]:
    """The `sample` keyframes `pick_keyframes` chooses among `pr`'s, each decoded alone from the packets a
    probe kept (`keyframes`: pts -> packet); a bad one is a ConveyorError naming the file."""
    ctx = keyframe_decoder(stream_ctx)
    frames = []
    try:
        for kp in pick_keyframes(pr.pts, pr.keyframes, sample):
            out = ctx.decode(keyframes[kp]) or ctx.decode(None)
            frames.append(out[0].to_ndarray(format="rgb24"))
            ctx.flush_buffers()
    except (av.error.FFmpegError, IndexError) as e:
        raise ConveyorError(path, f"undecodable keyframe: {e}") from None
    return frames


def keyframe_decoder(stream_ctx) -> av.CodecContext:
    """A decoder for a stream's keyframes, reused by this thread for every file with the same codec and
    parameters (one camera's episodes). Opening one per file (libdav1d allocates its tables and picture pool
    anew) cost ~4 % of decoding a file's three keyframes. Each keyframe decodes on its own and the decoder is
    flushed after it, so a reused decoder gives the same pixels. One thread (a few independent keyframes:
    decoder threads only add start-up cost)."""
    key = (stream_ctx.name, bytes(stream_ctx.extradata or b""))
    cache: dict = _decoders.__dict__.setdefault("open", {})
    ctx = cache.pop(key, None)
    if ctx is None:
        ctx = av.CodecContext.create(stream_ctx.name, "r")
        ctx.extradata = stream_ctx.extradata
        ctx.thread_count = 1
        while len(cache) >= _DECODERS_PER_THREAD:
            cache.pop(next(iter(cache)))
    cache[key] = ctx  # the most recently used last
    return ctx


def pick_keyframes(seg_pts: tuple[int, ...] | list[int], keyframes: frozenset[int] | tuple[int, ...], k: int
                   ) -> list[int]:
    """The keyframes (pts) that camera stats use for one episode: for k evenly spaced frame positions,
    the last keyframe at or before it. Chosen by position, so an episode sampled in its source file and
    in a concatenated store file yields the same frames. `keyframes` may be a set or a sorted tuple
    (`VideoProbe.sorted_keyframes`: O(log n) in a file of many episodes instead of O(n))."""
    n = len(seg_pts)
    if isinstance(keyframes, tuple):
        kfs = keyframes[bisect.bisect_left(keyframes, seg_pts[0]):bisect.bisect_right(keyframes, seg_pts[-1])]
    else:
        kfs = sorted(p for p in keyframes if seg_pts[0] <= p <= seg_pts[-1])
    out: list[int] = []
    for j in sorted({(i * n) // k for i in range(min(k, n))}):
        i = bisect.bisect_right(kfs, seg_pts[j]) - 1
        if i >= 0 and kfs[i] not in out:
            out.append(kfs[i])
    return out


_HEAD = 64  # written timestamps compared with the closed file's (at the start, where the edit list acts)


class StreamCopy:
    """Stream-copies inputs back to back into one mp4 as they arrive (`add`), so a caller can copy an episode
    while it loads the next; `close` returns each input's (from, to) seconds in the output.

    Each input is shifted so its first presented frame lands right after the previous input's last
    frame. The spans are what a decoder of the output will report: computed from the written timestamps
    once the closed file shows it holds them, else read back from its packets. Written to `<out>.part`,
    renamed to `out` by `close`.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.tmp = self.out.with_name(self.out.name + ".part")
        self.oc = None
        self.ostream = None
        self.base_tb: Fraction | None = None
        self.first: Path | None = None
        self.cursor = 0  # next free presentation tick in the first input's time base
        self.last_dts = -1
        self.lengths: list[int] = []
        self.starts: list[int] = []  # each input's first presented pts, as written (input time base)
        self.head: list[int] = []  # the first _HEAD written pts, in decode order
        self.max_pts = 0

    def add(self, path: Path, probed: VideoProbe | None = None, packets: list[av.Packet] | None = None) -> None:
        """Append one input. `probed`: its probe, when the caller has one (else a demux pass finds where it
        starts); `packets`: all its packets, demuxed by that probe (else the file is demuxed here); they are
        consumed. The input is opened only for what the caller did not bring (the first input also gives the
        output stream its codec parameters)."""
        try:
            if self.oc is None or probed is None or packets is None:
                with _open(path) as ic:
                    s = ic.streams.video[0]
                    if self.oc is None:
                        self.oc = av.open(str(self.tmp), "w", format="mp4")
                        self.ostream = self.oc.add_stream_from_template(s, opaque=True)
                        self.base_tb, self.first = Fraction(s.time_base.numerator, s.time_base.denominator), path
                    if probed is None:
                        probed = probe(path)
                    if packets is None:  # streamed: holding a whole file's packets costs ~80% of its size
                        self._append(path, probed, ic.demux(s))
                        return
            self._append(path, probed, packets)
            packets.clear()
        except av.error.FFmpegError as e:
            self.abort()
            raise ConveyorError(self.out, f"stream copy failed: {e}") from None
        except BaseException:
            self.abort()
            raise

    def _append(self, path: Path, probed: VideoProbe, packets) -> None:
        if probed.time_base != self.base_tb:
            raise ConveyorError(path, f"time base {probed.time_base} differs from {self.base_tb} of {self.first}")
        p0, d0 = probed.pts[0], probed.first_dts
        # B-frames decode before they show (dts < pts): start late enough that DTS stays non-negative and
        # strictly increasing across the join (lerobot's concat fails here)
        cursor = max(self.cursor, self.last_dts + 1 + p0 - d0)
        shift = cursor - p0
        last, last_dts, count, ostream, mux = cursor, self.last_dts, 0, self.ostream, self.oc.mux
        head = self.head
        for pk in packets:
            if not pk.size or pk.pts is None:
                continue
            count += 1
            pk.pts += shift
            pk.dts = (pk.dts if pk.dts is not None else pk.pts - shift) + shift
            last = max(last, pk.pts)
            last_dts = max(last_dts, pk.dts)
            if len(head) < _HEAD:
                head.append(pk.pts)
            pk.stream = ostream
            mux(pk)
        self.lengths.append(count)
        self.starts.append(cursor)
        self.cursor, self.last_dts, self.max_pts = last + probed.frame_ticks, last_dts, last

    def close(self) -> list[tuple[float, float]]:
        """Finish the file, rename it into place and return each input's (from, to) seconds in it."""
        try:
            if self.oc is not None:
                self.oc.close()
                self.oc = None
            spans = self._spans_from_written() or segment_spans(self.tmp, self.lengths)
            os.replace(self.tmp, self.out)
            return spans
        except av.error.FFmpegError as e:
            raise ConveyorError(self.out, f"stream copy failed: {e}") from None
        finally:
            self.abort()

    def _spans_from_written(self) -> list[tuple[float, float]] | None:
        """The spans from the timestamps this copy wrote, once the closed file shows it holds them: every
        frame (the sample count of its index), and its first packets carrying exactly the written timestamps,
        rescaled to the file's time base as the muxer does, moved by one constant (the edit list a B-frame
        stream gets). Reading back every packet (`segment_spans`) costs a demux of the whole file, the
        biggest part of a convert's tail; it remains the answer wherever this cannot show the same (None)."""
        if not self.lengths or not self.head:
            return None
        with _open(self.tmp) as c:
            s = c.streams.video[0]
            tb = Fraction(s.time_base.numerator, s.time_base.denominator)  # the muxer may pick its own
            if s.frames != sum(self.lengths) or not s.average_rate:
                return None
            scale = self.base_tb / tb

            def rescaled(pts: int) -> int:  # av_rescale_q's rounding: to nearest, halves away from zero
                x = pts * scale
                return int(x.numerator * 2 + x.denominator) // (2 * x.denominator) if x >= 0 else -rescaled(-pts)

            read = []
            for pk in c.demux(s):
                if pk.size and pk.pts is not None:
                    read.append(pk.pts)
                    if len(read) == len(self.head):
                        break
        if len(read) != len(self.head):
            return None
        offset = read[0] - rescaled(self.head[0])
        if any(r - rescaled(w) != offset for r, w in zip(read, self.head)):
            return None
        ticks = frame_ticks(s.average_rate, tb)
        bounds = [rescaled(p) + offset for p in self.starts] + [rescaled(self.max_pts) + offset + ticks]
        return [(float(a * tb), float(b * tb)) for a, b in zip(bounds, bounds[1:])]

    def abort(self) -> None:
        """Drop the partial output (idempotent; a closed or renamed output is left alone)."""
        if self.oc is not None:
            with contextlib.suppress(Exception):
                self.oc.close()
            self.oc = None
        self.tmp.unlink(missing_ok=True)


def concat(inputs: list[Path], out: Path) -> list[tuple[float, float]]:
    """Stream-copy `inputs` back to back into `out`; return each input's (from, to) seconds in `out`."""
    copy = StreamCopy(out)
    for path in inputs:
        copy.add(path)
    return copy.close()


def segment_spans(path: Path, lengths: list[int]) -> list[tuple[float, float]]:
    """(from, to) seconds of consecutive segments of `lengths` frames, from the file's real packets."""
    pr = probe(path)
    if pr.frames != sum(lengths):
        raise ConveyorError(path, f"expected {sum(lengths)} frames after concatenation, found {pr.frames}")
    spans, i = [], 0
    for n in lengths:
        start = pr.pts[i]
        end = pr.pts[i + n] if i + n < len(pr.pts) else pr.pts[-1] + pr.frame_ticks
        spans.append((float(start * pr.time_base), float(end * pr.time_base)))
        i += n
    return spans


def decode_frames(path: Path, times: list[float], tol: float = 1e-4) -> list[np.ndarray]:
    """RGB frames presented at `times` (seconds), seeking to the keyframe before each; exact pixels."""
    out: list[np.ndarray] = []
    with _open(path) as c:
        s = c.streams.video[0]
        tb = s.time_base
        for t in times:
            found = None
            try:
                c.seek(int(t / tb), stream=s, backward=True, any_frame=False)
                for frame in c.decode(s):
                    ft = float(frame.pts * tb)
                    if abs(ft - t) < tol:
                        found = frame.to_ndarray(format="rgb24")
                        break
                    if ft > t + tol:
                        break
            except av.error.FFmpegError as e:  # damaged packets: name the file and the time, not a traceback
                raise ConveyorError(path, f"undecodable frame near t={t:.6f} s: {e}") from None
            if found is None:
                raise ConveyorError(path, f"no frame at t={t:.6f} s")
            out.append(found)
    return out


def sample_keyframes(path: Path, pr: VideoProbe, seg_pts: tuple[int, ...], k: int, container=None
                     ) -> list[np.ndarray]:
    """The frames `pick_keyframes` chooses for one episode inside a (concatenated) file, by seeking.

    `container`: an open `av` container of `path` to reuse (opening parses the whole index: checking
    every episode of a file would otherwise cost O(episodes^2))."""
    frames: list[np.ndarray] = []
    with (_open(path) if container is None else contextlib.nullcontext(container)) as c:
        s = c.streams.video[0]
        if not s.codec_context.is_open:
            s.codec_context.thread_count = 1
        for kp in pick_keyframes(seg_pts, pr.sorted_keyframes, k):
            try:
                c.seek(kp, stream=s, backward=True, any_frame=False)
                for frame in c.decode(s):
                    if frame.pts == kp:
                        frames.append(frame.to_ndarray(format="rgb24"))
                        break
                    if frame.pts > kp:
                        raise ConveyorError(path, f"keyframe at pts {kp} not found after seeking")
                else:  # the decoder gave up before reaching it: damaged packets
                    raise ConveyorError(path, f"keyframe at pts {kp} does not decode")
            except av.error.FFmpegError as e:
                raise ConveyorError(path, f"undecodable keyframe at pts {kp}: {e}") from None
    return frames


def camera_frames(path: Path, pr: VideoProbe, seg_pts: tuple[int, ...], k: int, container=None
                  ) -> list[np.ndarray]:
    """The frames an episode's camera stats come from: its `sample_keyframes`, or, for a span with no keyframe
    of its own (a trimmed episode: `conveyor trim` keeps any frame range), k evenly spaced frames of it."""
    frames = sample_keyframes(path, pr, seg_pts, k, container) if seg_pts else []
    if frames or not seg_pts:
        return frames
    n = len(seg_pts)
    return decode_frames(path, [float(seg_pts[(i * n) // k] * pr.time_base) for i in range(min(k, n))])
