"""Notice within seconds when recorded episodes become complete, and hand them to a callback.

watchdog (inotify here) tells us *that* something changed in a source folder; the core completeness
rules (`conveyor.source`: episodes.jsonl line + parquet + every camera mp4, consistent lengths) tell us
*which* episodes are complete. A complete episode is handed over at once when its files prove they are
final (`conveyor.evidence`: parquet footer rows = mp4 packets = the jsonl line's length, every mp4's boxes
complete). Otherwise (a camera file missing or half-copied, another container) it must have settled: none
of its files was modified during the last `settle_seconds` (mtime-based), which covers copies (rsync,
network mounts) that write the jsonl line before the media. Events are debounced, except a change of
`meta/episodes.jsonl` (the recorder's "episode finished"), which is scanned at once; a periodic full
rescan catches events that never arrive (NFS/SMB mounts, missed inotify events).

A v3.0 source (a lerobot 0.6 session, or a folder of sessions) needs no settling: `V30Source` only calls
an episode complete once its metadata and data parquets are closed (footer written) and its mp4s are
finalized, so every episode it returns is handed over at once. A change under `meta/` (the recorder's
finalize closes `meta/episodes`) is scanned at once; a session whose info.json and metadata files have not
changed since its last scan, and has nothing pending, is not read again.

No Prefect here: `flows/watch.py` wraps this and runs the ingest flow from the callback.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from conveyor.errors import ConveyorError
from conveyor.evidence import episode_final
from conveyor.source import V21Source
from conveyor.sessions import open_source, session_paths
from conveyor.source_v3 import V30Source

log = logging.getLogger("conveyor.watcher")

ReadyCallback = Callable[[str, list[int]], None]
ErrorCallback = Callable[[str, Exception], None]


@dataclass
class _SourceState:
    name: str
    path: Path
    dirty_at: float | None = 0.0           # monotonic time of the last unhandled event; 0 = scan at start
    urgent: bool = False                   # episodes.jsonl changed: scan without waiting for the debounce
    next_rescan: float = 0.0
    handled: set[int] = field(default_factory=set)
    settle_at: dict[int, float] = field(default_factory=dict)  # episode -> wall time it will have settled
    watched: bool = False
    last_error: str | None = None
    unconfirmed: str | None = None          # an error seen once: maybe a file caught mid-write (info.json)
    sessions: dict[str, tuple] = field(default_factory=dict)  # v3.0 session -> (stamp, handled episodes)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "EpisodeWatcher", name: str):
        self.watcher, self.name = watcher, name

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):  # reads (ours included) are not changes
            return
        path = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
        self.watcher.mark_dirty(self.name, urgent=path.endswith("episodes.jsonl") or
                                f"{os.sep}meta{os.sep}episodes{os.sep}" in path)


class EpisodeWatcher:
    """Calls `on_ready(source_name, episode_indices)` once per batch of newly complete episodes, each
    either proven final by its files or settled.

    Episodes the core rules call broken (line present, files missing or inconsistent) are handed over
    too, once settled, so that ingest quarantines them with a reason instead of them waiting forever.
    If `on_ready` raises, the batch is not marked handled and is offered again at the next rescan.
    """

    def __init__(self, sources: Mapping[str, str | Path], *, on_ready: ReadyCallback,
                 settle_seconds: float = 1.0, debounce_seconds: float = 0.3, rescan_seconds: float = 60.0,
                 on_error: ErrorCallback | None = None):
        self.sources = {n: _SourceState(n, Path(p)) for n, p in sources.items()}
        self.on_ready, self.on_error = on_ready, on_error
        self.settle, self.debounce, self.rescan = settle_seconds, debounce_seconds, rescan_seconds
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._observer: Observer | None = None

    # -- events -------------------------------------------------------------------------------------

    def mark_dirty(self, name: str, urgent: bool = False) -> None:
        with self._lock:
            st = self.sources[name]
            st.dirty_at = time.monotonic()
            st.urgent = st.urgent or urgent
        self._wake.set()

    def start(self) -> None:
        """Start the filesystem observer (idempotent); folders that do not exist yet are retried later."""
        if self._observer is None:
            self._observer = Observer()
            self._observer.daemon = True
            self._observer.start()
        for st in self.sources.values():
            self._watch(st)

    def _watch(self, st: _SourceState) -> None:
        if st.watched or self._observer is None:
            return
        try:
            self._observer.schedule(_Handler(self, st.name), str(st.path), recursive=True)
            st.watched = True
        except OSError as e:  # not there yet (or unwatchable mount): the rescan still covers it
            log.debug("cannot watch %s yet: %s", st.path, e)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        self._wake.set()

    # -- scanning -----------------------------------------------------------------------------------

    def poll(self) -> float:
        """Scan the sources that are due; return how many seconds until something is due again."""
        now = time.monotonic()
        for st in self.sources.values():
            with self._lock:
                debounced = st.dirty_at is not None and (st.urgent or now - st.dirty_at >= self.debounce)
                rescan = now >= st.next_rescan
                settling = any(t <= time.time() for t in st.settle_at.values())
                if not (debounced or rescan or settling):
                    continue
                if debounced:
                    st.dirty_at, st.urgent = None, False
            if rescan:
                st.next_rescan = now + self.rescan
                self._watch(st)
            self._scan(st)
        return self._next_due()

    def _next_due(self) -> float:
        now, wall = time.monotonic(), time.time()
        due = []
        with self._lock:
            for st in self.sources.values():
                due.append(st.next_rescan - now)
                if st.dirty_at is not None:
                    due.append(0.0 if st.urgent else st.dirty_at + self.debounce - now)
                due.extend(t - wall for t in st.settle_at.values())
        return max(0.0, min(due)) if due else self.rescan

    def _scan(self, st: _SourceState) -> None:
        if _is_v30(st.path):
            return self._scan_v30(st)
        try:
            src = V21Source.open(st.path, info_settle_s=0)  # a torn info.json: looked at again below
            complete, scan = src.scan(skip=st.handled)
        except Exception as e:  # noqa: BLE001 - one unreadable file must not kill the watcher
            msg = str(e) if isinstance(e, ConveyorError) else f"{type(e).__name__}: {e}"
            if msg != st.unconfirmed and msg != st.last_error:
                # scans start as soon as episodes.jsonl changes, while the recorder may still be rewriting
                # info.json (truncate, then write): look again after the debounce before reporting
                st.unconfirmed = msg
                self.mark_dirty(st.name)
                return
            if msg != st.last_error:  # a source that does not exist yet is reported once, not every scan
                st.last_error = msg
                self._report(st.name, e)
            return
        st.last_error = st.unconfirmed = None
        candidates = [ep for ep in scan.complete if ep not in st.handled] + \
                     [ep for ep in scan.bad if ep not in st.handled]
        wall = time.time()
        ready = []
        final = {e.index for e in complete if episode_final(list(e.videos.values()))}
        st.settle_at.clear()  # rebuilt below, so episodes that vanished stop waking us
        for ep in sorted(set(candidates)):
            if ep in final:  # proven final: no need to wait for the files to go quiet
                ready.append(ep)
                continue
            newest = _newest_mtime(src.episode_files(ep))
            if wall - newest >= self.settle:
                ready.append(ep)
                st.settle_at.pop(ep, None)
            else:
                st.settle_at[ep] = newest + self.settle
        if not ready:
            return
        try:
            self.on_ready(st.name, ready)
        except Exception as e:  # noqa: BLE001 - reported, retried at the next rescan
            self._report(st.name, e)
            return
        st.handled.update(ready)

    def _scan_v30(self, st: _SourceState) -> None:
        """Each session of a v3.0 source whose files changed: its complete (and broken) episodes not yet
        handed over, at once (completeness needs closed, finalized files: nothing to settle)."""
        ready: list[int] = []
        done: dict[str, tuple] = {}
        for path in session_paths(st.path):
            key = str(path)
            stamp = _session_stamp(path)
            old_stamp, handled = st.sessions.get(key, (None, set()))
            if stamp == old_stamp:
                continue
            try:
                src = open_source(path, info_settle_s=0)
                if not isinstance(src, V30Source):
                    raise ConveyorError(path / "meta" / "info.json", "a v2.1 dataset inside a folder of v3.0 "
                                                                     "sessions: name it as its own source")
                complete, scan = src.scan(skip=handled, probe_videos=False)
            except Exception as e:  # noqa: BLE001 - one unreadable session must not stop the others
                msg = str(e) if isinstance(e, ConveyorError) else f"{type(e).__name__}: {e}"
                if msg != st.last_error:
                    st.last_error = msg
                    self._report(st.name, e)
                continue
            new = sorted({e.index for e in complete} | set(scan.bad))
            ready += new
            # not stamped while episodes are still being recorded: look again at the next event
            done[key] = (stamp if not scan.incomplete else None, handled | set(new))
        if not ready:
            st.sessions.update(done)
            return
        try:
            self.on_ready(st.name, ready)
        except Exception as e:  # noqa: BLE001 - reported, retried at the next rescan
            self._report(st.name, e)
            return
        st.sessions.update(done)

    def _report(self, name: str, e: Exception) -> None:
        if self.on_error:
            self.on_error(name, e)
        else:
            log.warning("source %s: %s", name, e)

    # -- loop ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, max_seconds: float | None = None,
            on_tick: Callable[[], None] | None = None) -> None:
        """Watch until `stop` is set or `max_seconds` passed; callbacks run in this thread.

        `on_tick` runs at least once a second (the caller's housekeeping, e.g. starting deferred checks).
        """
        stop = stop or threading.Event()
        end = None if max_seconds is None else time.monotonic() + max_seconds
        self.start()
        try:
            while not stop.is_set():
                wait = self.poll()
                if on_tick:
                    on_tick()
                if end is not None:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    wait = min(wait, left)
                self._wake.wait(min(wait, 1.0))  # wake at least every second to notice `stop`
                self._wake.clear()
        finally:
            self.stop()


def _is_v30(path: Path) -> bool:
    """A v3.0 dataset, or a folder of datasets (sessions): read with `V30Source`."""
    paths = session_paths(path)
    if not paths:  # an existing folder without meta/ yet: a folder for sessions (or a v2.1 recorder not started)
        return Path(path).is_dir() and not (Path(path) / "meta").exists()
    if paths != [Path(path).resolve()]:
        return True
    try:
        import json

        return json.loads((paths[0] / "meta" / "info.json").read_text()).get("codebase_version") == "v3.0"
    except (OSError, ValueError):
        return False


def _session_stamp(path: Path) -> tuple:
    """(name, size, mtime_ns) of info.json and every metadata, data and video file: what a scan depends on."""
    out = []
    for sub in ("meta", "data", "videos"):
        for dirpath, _, files in os.walk(path / sub):
            for f in files:
                try:
                    s = os.stat(os.path.join(dirpath, f))
                except OSError:
                    continue
                out.append((os.path.join(dirpath, f), s.st_size, s.st_mtime_ns))
    return tuple(sorted(out))


def _newest_mtime(paths: list[Path]) -> float:
    newest = 0.0
    for p in paths:
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:  # missing file of a broken episode: judge by the files that exist
            continue
    return newest
