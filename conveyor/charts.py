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
    from matplotlib.ticker import MaxNLocator

    fig, (grow, hist) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90)
    commits = [v.commit for v in detail.versions]
    grow.bar(commits, [v.total_episodes for v in detail.versions], color="tab:blue", alpha=0.6, width=0.8)
    grow.set_xlabel("commit")
    grow.set_ylabel("episodes", color="tab:blue")
    grow.set_title(f"{detail.name}: {detail.episodes} episodes, {detail.hours * 60:.1f} min")
    grow.grid(alpha=0.3, axis="y")
    grow.yaxis.set_major_locator(MaxNLocator(integer=True))
    if commits:
        step = max(1, len(commits) // 12)
        grow.set_xticks(commits[::step])
    minutes = grow.twinx()
    fps = detail.fps or 1
    minutes.plot(commits, [v.total_frames / fps / 60 for v in detail.versions], color="tab:orange", marker="o",
                 markersize=3 if len(commits) < 40 else 0)
    minutes.set_ylabel("minutes recorded", color="tab:orange")
    minutes.set_ylim(bottom=0)
    seconds = [n / fps for n in detail.lengths.frames]
    hist.hist(seconds or [0], bins="auto", color="tab:green", alpha=0.8, rwidth=0.9)
    hist.set_xlabel("episode length (s)")
    hist.set_ylabel("episodes")
    hist.set_title("episode lengths")
    hist.grid(alpha=0.3, axis="y")
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
