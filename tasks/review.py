"""The review sheet of an ingest run's new episodes, as a markdown artifact (key `review-<store>`).

Bounded like every artifact here: at most `ARTIFACT_MAX_EPISODES` cards and `ARTIFACT_MAX_BYTES` of pictures
(3 small thumbnails per camera), the rest named with the `conveyor review` command that shows them. The run
page's artifact card shows only the description, so it carries the first new episode's frames. The watch flow
makes it off the latency path (~0.3 s CPU per episode): as a task of the watch run, attached to the ingest run.
"""
from __future__ import annotations

from pathlib import Path
from uuid import UUID

from prefect import get_run_logger, task

from conveyor.review import (ARTIFACT_MAX_BYTES, ARTIFACT_MAX_EPISODES, contact_sheet, markdown_sheet, review,
                             spans)
from tasks.artifacts import slug
from tasks.views import _markdown


@task(name="review-sheet")
def review_sheet(store_name: str, store_path: Path, episodes: list[int], flow_run_id: str | UUID | None = None
                 ) -> str:
    """Cards for `episodes` (the run's new ones) as one markdown artifact; returns its key.
    `flow_run_id`: the ingest run to attach it to, when this runs elsewhere (the watch run)."""
    sheet = review(Path(store_path), episodes, store_name, frames=3, thumb_width=128,
                   max_episodes=ARTIFACT_MAX_EPISODES, max_bytes=ARTIFACT_MAX_BYTES)
    key = f"review-{slug(store_name)}"
    description = f"{store_name}: review {len(sheet.asked)} new episode(s), {spans(sheet.asked)}"
    first = contact_sheet(sheet.cards[0]) if sheet.cards else None
    if first is not None:  # the run page's card shows the description only: the first new episode's frames
        description += f"\n\n![{first.alt}]({first.uri()})"
    _markdown(key, description, markdown_sheet(sheet), flow_run_id)
    get_run_logger().info("review sheet %s: %d of %d new episode(s) of %s", key, len(sheet.cards),
                          len(sheet.asked), store_name)
    return key
