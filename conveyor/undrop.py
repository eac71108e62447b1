"""`undrop`: a dropped source episode comes back by being read from its source again, through ingest's own
phases, in one commit (its rows left the data files when it was dropped, and compaction may have reclaimed its
video span). It lands at the end of the store, as recorded: untrimmed, with the source's task text."""
from __future__ import annotations

from pathlib import Path

from conveyor.errors import ConveyorError
from conveyor.ingest import Plan, write_data, write_episode_metadata, write_info_stats_tasks_ledger, write_videos
from conveyor.ingest_writers import VideoWriter
from conveyor.ledger import Curation, LedgerState
from conveyor.reports import CurationReport, IngestReport
from conveyor.sessions import open_source
from conveyor.store import Store


def undrop_locked(s: Store, keys: list[tuple[str, int]], state: LedgerState, curation: Curation) -> CurationReport:
    """Re-add the source episodes `keys` (one source) at the end of the store; the caller holds the lock."""
    sources = sorted({k[0] for k in keys})
    if len(sources) > 1:
        raise ConveyorError(s.root, f"the episodes come from {len(sources)} sources; undrop those of one source "
                                    "at a time")
    try:
        src = open_source(sources[0])  # a v2.1 recording or a v3.0 session
    except (ConveyorError, OSError) as e:
        raise ConveyorError(sources[0], f"cannot undrop: its source is not readable ({e})") from None
    info = s.info
    src.check_compatible(info, s.root)
    wanted = {k[1] for k in keys}
    records = src.episode_records()
    gone = sorted(wanted - set(records))
    if gone:
        raise ConveyorError(src.root, f"cannot undrop: source episode {gone[0]} is no longer in the recording")
    ready, scan = src.scan(skip=set(records) - wanted, probe_videos=False)
    bad = {e: r for e, r in scan.bad.items() if e in wanted}
    if bad:
        e, why = next(iter(bad.items()))
        raise ConveyorError(src.root, f"cannot undrop source episode {e}: {why}")
    report = IngestReport(source=str(src.root), store=str(s.root), version=s.version)
    plan = Plan(src, info, None, [r for r in ready if r.index in wanted], report)
    with s.transaction("undrop") as tx, VideoWriter(tx, s, plan) as video:
        batch = write_data(tx, s, plan, None, video)
        if report.quarantined:
            raise ConveyorError(src.root, f"cannot undrop: {report.quarantined[0].reason}")
        videos = write_videos(plan, video, None)
        rows = write_episode_metadata(tx, s, plan, batch, videos)
        write_info_stats_tasks_ledger(tx, s, plan, batch, rows)
        tx.ledger.insert(0, curation)  # the order before these records append the episodes at the end
        video.staged()
    v = tx.version
    return CurationReport(store=str(s.root), action="undrop", episodes=[], version=v, parent=v,
                          episodes_after=v.total_episodes, frames_after=v.total_frames,
                          added=[r["episode_index"] for r in rows],
                          bytes_written=sum(e.size for e in tx.add.values()))
