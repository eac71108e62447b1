"""Offline evaluation (seed plan §8.6): a checkpoint predicts action chunks on held-out episodes of its
store; per-joint MAE/MSE against the recorded actions, so two runs (ACT vs SmolVLA) compare side by side.

Uses lerobot's own loaders (`PreTrainedConfig`/policy `from_pretrained`, the checkpoint's saved
pre/post-processors, `LeRobotDataset` with an action-chunk delta window) through `lerobot_eval`, run in the
lerobot environment that trained the checkpoint.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, Field

from conveyor.errors import ConveyorError
from conveyor.training import checkpoints as ck, lerobot_env, lerobot_eval
from conveyor.training.lerobot_env import OFFLINE_ENV, LerobotEnv


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
    lerobot: str = Field("", description="the lerobot version that loaded the checkpoint (the run's own)")
    seconds: float = 0.0

    def table(self) -> list[dict]:
        rows = [{"joint": j.joint, "MAE": round(j.mae, 5), "MSE": round(j.mse, 6)} for j in self.joints]
        return rows + [{"joint": "all", "MAE": round(self.mae, 5), "MSE": round(self.mse, 6)}]

    def summary(self) -> str:
        seen = "held-out" if self.held_out else "seen in training"
        return (f"{self.run} step {self.step} ({self.policy_type}) on episodes {self.episodes} ({seen}, "
                f"{self.frames} frames): MAE {self.mae:.4f}, MSE {self.mse:.5f}"
                + (f" (loaded by lerobot {self.lerobot})" if self.lerobot else ""))


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


def _run_env(run_dir: Path, settings) -> LerobotEnv:
    """The lerobot the run trained with (run.json's `lerobot_train`) reads its checkpoint: a 0.4.4 checkpoint
    is not 0.6's to load. A run folder without that record, or whose environment is gone, uses the settings'."""
    try:
        exe = json.loads((run_dir / "run.json").read_text()).get("lerobot_train")
    except (OSError, ValueError):
        exe = None
    if exe and Path(exe).is_file():
        return lerobot_env.for_executable(Path(exe))
    return lerobot_env.resolve(settings)


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
    train_cfg = json.loads(ckpt.train_config.read_text())
    root = Path(train_cfg["dataset"]["root"])
    if not (root / "meta" / "info.json").is_file():
        raise ConveyorError(root, "the run's dataset is not on this machine")
    job = {"pretrained": str(ckpt.path / "pretrained_model"), "root": str(root),
           "repo_id": train_cfg["dataset"]["repo_id"], "episodes": episodes,
           "trained_episodes": _trained_episodes(run_dir),
           "max_frames": max_frames, "device": device}
    env = _run_env(run_dir, settings)
    if env.same_as_conveyor:
        out = lerobot_eval.predict_errors(job)
    else:
        out = lerobot_env.run_script(env, Path(lerobot_eval.__file__), job, "the evaluation", 2 * 3600,
                                     lerobot_env.pyav_only({**os.environ, **OFFLINE_ENV}))  # it decodes with PyAV
    if out.get("error"):
        raise ConveyorError(root, out["error"])
    n, dim = max(int(out["count"]), 1), len(out["names"])
    joints = [JointError(joint=j, mae=a / n, mse=q / n)
              for j, a, q in zip(out["names"], out["abs_sum"], out["sq_sum"])]
    return EvalReport(run=name, checkpoint=ckpt.name, step=ckpt.step, policy_type=out["policy_type"],
                      dataset_root=str(root), episodes=out["episodes"], held_out=out["held_out"], frames=out["frames"],
                      joints=joints, mae=sum(out["abs_sum"]) / (n * dim), mse=sum(out["sq_sum"]) / (n * dim),
                      lerobot=out["lerobot"], seconds=time.monotonic() - t0)
