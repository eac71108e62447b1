"""Loss curve PNG from the run's metrics.jsonl (all attempts, so a resumed run shows one curve)."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    by_step = {r["step"]: r for r in rows}        # a resumed attempt re-logs steps after its checkpoint
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(metrics_path: Path, png: Path, title: str) -> Path | None:
    """Write `png` (loss and grad norm vs step); None when there is nothing to plot yet."""
    data = loss_png(read_metrics(metrics_path), title)
    if data is None:
        return None
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(data)
    return png


def loss_png(rows: list[dict], title: str) -> bytes | None:
    """The loss curve as PNG bytes (what the run page embeds: the viewer may be on another machine)."""
    if not rows:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], label="loss", color="tab:blue", marker="." if len(rows) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["grad_norm"] for r in rows], label="grad norm", color="tab:orange", alpha=0.5)
    ax2.set_ylabel("grad norm")
    handles = ax.get_lines() + ax2.get_lines()
    ax.legend(handles, [h.get_label() for h in handles], loc="best", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
