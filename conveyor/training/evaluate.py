"""Offline evaluation (seed plan §8.6): a checkpoint predicts action chunks on held-out episodes of its
store; per-joint MAE/MSE against the recorded actions, so two runs (ACT vs SmolVLA) compare side by side.

Uses lerobot's own loaders: `PreTrainedConfig`/policy `from_pretrained`, the checkpoint's saved
pre/post-processors (normalisation + tokenizer), and `LeRobotDataset` with an action-chunk delta window.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel, Field

from conveyor.errors import ConveyorError
from conveyor.training import checkpoints as ck


class JointError(BaseModel):
    joint: str
    mae: float
    mse: float


class EvalReport(BaseModel):
    run: str
    checkpoint: str
    step: int
    policy_type: str
    dataset_root: str
    episodes: list[int]
    held_out: bool = Field(description="False when the episodes were also in the training data")
    frames: int
    joints: list[JointError]
    mae: float
    mse: float
    seconds: float = 0.0

    def table(self) -> list[dict]:
        rows = [{"joint": j.joint, "MAE": round(j.mae, 5), "MSE": round(j.mse, 6)} for j in self.joints]
        return rows + [{"joint": "all", "MAE": round(self.mae, 5), "MSE": round(self.mse, 6)}]

    def summary(self) -> str:
        seen = "held-out" if self.held_out else "seen in training"
        return (f"{self.run} step {self.step} ({self.policy_type}) on episodes {self.episodes} ({seen}, "
                f"{self.frames} frames): MAE {self.mae:.4f}, MSE {self.mse:.5f}")


def resolve_run(run: str, settings) -> tuple[str, Path]:
    """A run name (under work_dir/runs), a run folder, or a checkpoint folder -> (name, run folder)."""
    p = Path(run).expanduser()
    if not p.is_dir():
        p = settings.work_dir / "runs" / run
    if (p / "pretrained_model").is_dir():          # a checkpoint folder: <run>/lerobot/checkpoints/<step>
        p = p.parents[2]
    if not (p / "lerobot" / "checkpoints").is_dir():
        raise ConveyorError(p, "not a conveyor training run (no lerobot/checkpoints inside)")
    return p.name, p.resolve()


def _trained_episodes(run_dir: Path) -> int | None:
    """How many episodes the run's dataset version had (from run.json's lineage)."""
    try:
        meta = json.loads((run_dir / "run.json").read_text())
        return ((meta.get("dataset") or {}).get("version") or {}).get("total_episodes")
    except (OSError, ValueError):
        return None


def _held_out(run_dir: Path, total: int) -> tuple[list[int], bool]:
    """Episodes added to the store after the run's dataset version; else the last episode (seen)."""
    trained = _trained_episodes(run_dir)
    if trained and trained < total:
        return list(range(trained, total)), True
    return [total - 1], False


def evaluate(run: str, settings, *, episodes: list[int] | None = None, checkpoint: str | None = None,
             max_frames: int = 256, device: str | None = None) -> EvalReport:
    t0 = time.monotonic()
    name, run_dir = resolve_run(run, settings)
    lerobot_dir = run_dir / "lerobot"
    if checkpoint:
        found = [c for c in ck.local_checkpoints(lerobot_dir) if c.name == checkpoint or str(c.step) == checkpoint]
        if not found:
            raise ConveyorError(lerobot_dir / "checkpoints" / checkpoint, "no such checkpoint in this run")
        ckpt = found[0]
    else:
        ckpt = ck.newest_local(lerobot_dir)
        if ckpt is None:
            raise ConveyorError(lerobot_dir, "the run has no complete checkpoint yet")
    pretrained = ckpt.path / "pretrained_model"
    train_cfg = json.loads(ckpt.train_config.read_text())
    root = Path(train_cfg["dataset"]["root"])
    if not (root / "meta" / "info.json").is_file():
        raise ConveyorError(root, "the run's dataset is not on this machine")

    import torch
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = LeRobotDatasetMetadata(train_cfg["dataset"]["repo_id"], root=root)
    total = meta.total_episodes
    if episodes is None:
        episodes, held_out = _held_out(run_dir, total)
    else:
        trained = _trained_episodes(run_dir)
        held_out = trained is not None and min(episodes, default=0) >= trained
    bad = [e for e in episodes if not 0 <= e < total]
    if bad:
        raise ConveyorError(root, f"episodes {bad} are not in the store (it has {total})")

    cfg = PreTrainedConfig.from_pretrained(pretrained)
    cfg.device = dev
    policy = get_policy_class(cfg.type).from_pretrained(pretrained, config=cfg).to(dev).eval()
    pre, post = make_pre_post_processors(cfg, pretrained_path=str(pretrained),
                                         preprocessor_overrides={"device_processor": {"device": dev}})
    chunk = int(getattr(cfg, "chunk_size", None) or getattr(cfg, "horizon", 1))
    ds = LeRobotDataset(meta.repo_id, root=root, episodes=episodes, video_backend="pyav",
                        delta_timestamps={"action": [i / meta.fps for i in range(chunk)]})
    stride = max(1, len(ds) // max_frames)
    abs_sum = sq_sum = None
    count = None
    frames = 0
    with torch.inference_mode():
        for idx in range(0, len(ds), stride):
            item = ds[idx]
            gt, pad = item["action"], item.get("action_is_pad")
            batch = {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else [v]) for k, v in item.items()
                     if k != "action" and not k.endswith("_is_pad")}
            policy.reset()
            pred = post(policy.predict_action_chunk(pre(batch)))
            pred = pred.reshape(-1, pred.shape[-1])[: gt.shape[0], : gt.shape[-1]].float().cpu()
            n = min(pred.shape[0], gt.shape[0])
            valid = ~pad[:n] if pad is not None else torch.ones(n, dtype=torch.bool)
            diff = (pred[:n] - gt[:n])[valid]
            a, s, c = diff.abs().sum(0), (diff ** 2).sum(0), valid.sum()
            abs_sum = a if abs_sum is None else abs_sum + a
            sq_sum = s if sq_sum is None else sq_sum + s
            count = c if count is None else count + c
            frames += 1
    names = (meta.features.get("action", {}).get("names") or [])
    dim = abs_sum.shape[0]
    names = list(names) if isinstance(names, list) and len(names) == dim else [f"joint_{i}" for i in range(dim)]
    n = max(int(count), 1)
    joints = [JointError(joint=names[i], mae=float(abs_sum[i] / n), mse=float(sq_sum[i] / n)) for i in range(dim)]
    return EvalReport(run=name, checkpoint=ckpt.name, step=ckpt.step, policy_type=cfg.type, dataset_root=str(root),
                      episodes=episodes, held_out=held_out, frames=frames, joints=joints,
                      mae=float(abs_sum.sum() / (n * dim)), mse=float(sq_sum.sum() / (n * dim)),
                      seconds=time.monotonic() - t0)
