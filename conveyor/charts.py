"""Small PNG pictures of a store for people: growth over commits and the episode-length histogram.

Returned as bytes so a flow can embed them in an artifact (the viewer's browser may be on another machine).
"""
from __future__ import annotations

import io

from conveyor.inventory import StoreDetail


def store_png(detail: StoreDetail) -> bytes:
    """Episodes and hours after each commit (left), episode lengths in seconds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (grow, hist) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90)
    commits = [v.commit for v in detail.versions]
    grow.step(commits, [v.total_episodes for v in detail.versions], where="post", color="tab:blue",
              label="episodes")
    grow.set_xlabel("commit")
    grow.set_ylabel("episodes", color="tab:blue")
    grow.set_title(f"{detail.name}: {detail.episodes} episodes, {detail.hours * 60:.1f} min")
    grow.grid(alpha=0.3)
    if commits:
        grow.set_xticks(commits if len(commits) <= 12 else commits[:: max(1, len(commits) // 12)])
    hours = grow.twinx()
    fps = detail.fps or 1
    hours.step(commits, [v.total_frames / fps / 60 for v in detail.versions], where="post", color="tab:orange",
               alpha=0.7, label="minutes")
    hours.set_ylabel("minutes recorded", color="tab:orange")
    seconds = [n / fps for n in detail.lengths.frames]
    hist.hist(seconds or [0], bins=min(20, max(1, len(set(seconds)))), color="tab:green", alpha=0.8)
    hist.set_xlabel("episode length (s)")
    hist.set_ylabel("episodes")
    hist.set_title("episode lengths")
    hist.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
