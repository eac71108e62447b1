"""What offline evaluation asks the run's own lerobot: load a checkpoint with its saved pre/post-processors,
predict action chunks on some episodes, and sum the per-joint errors against the recorded actions.

Standalone on purpose (standard library + torch + lerobot only), like `lerobot_probe`: a checkpoint is read
by the lerobot that wrote it, so when the run's `lerobot-train` lives in another interpreter (0.4.4 on
Python 3.11, a fork) `conveyor.training.evaluate` runs this file there (`python lerobot_eval.py < job.json`)
and reads one JSON object from stdout; when it is conveyor's own environment, it is imported.
"""
from __future__ import annotations

import json
import sys
from importlib import metadata


def predict_errors(job: dict) -> dict:
    """job: pretrained (checkpoint's pretrained_model folder), root and repo_id (the dataset), episodes (None:
    those added after the run's dataset version, see below), trained_episodes (that version's episode count,
    or None), max_frames, device. Returns the sums the caller turns into MAE/MSE, the joint names, and what
    was evaluated (episodes, and whether the run never saw them)."""
    import torch
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    dev = job.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = LeRobotDatasetMetadata(job["repo_id"], root=job["root"])
    total = meta.total_episodes
    episodes, trained = job.get("episodes"), job.get("trained_episodes")
    if episodes is None:  # the episodes added after the run's dataset version; else the last one (seen)
        held_out = bool(trained) and trained < total
        episodes = list(range(trained, total)) if held_out else [total - 1]
    else:
        held_out = trained is not None and min(episodes, default=0) >= trained
    bad = [e for e in episodes if not 0 <= e < total]
    if bad:
        return {"error": f"episodes {bad} are not in the store (it has {total})"}

    pretrained = job["pretrained"]
    cfg = PreTrainedConfig.from_pretrained(pretrained)
    cfg.device = dev
    policy = get_policy_class(cfg.type).from_pretrained(pretrained, config=cfg).to(dev).eval()
    pre, post = make_pre_post_processors(cfg, pretrained_path=str(pretrained),
                                         preprocessor_overrides={"device_processor": {"device": dev}})
    chunk = int(getattr(cfg, "chunk_size", None) or getattr(cfg, "horizon", 1))
    ds = LeRobotDataset(meta.repo_id, root=job["root"], episodes=episodes, video_backend="pyav",
                        delta_timestamps={"action": [i / meta.fps for i in range(chunk)]})
    stride = max(1, len(ds) // max(1, int(job.get("max_frames", 256))))
    abs_sum = sq_sum = None
    count, frames = 0, 0
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
            a, s = diff.abs().sum(0), (diff ** 2).sum(0)
            abs_sum = a if abs_sum is None else abs_sum + a
            sq_sum = s if sq_sum is None else sq_sum + s
            count += int(valid.sum())
            frames += 1
    names = meta.features.get("action", {}).get("names") or []
    dim = abs_sum.shape[0]
    names = list(names) if isinstance(names, list) and len(names) == dim else [f"joint_{i}" for i in range(dim)]
    return {"error": None, "policy_type": cfg.type, "episodes": episodes, "held_out": held_out,
            "frames": frames, "count": count, "names": names, "abs_sum": abs_sum.tolist(),
            "sq_sum": sq_sum.tolist(), "lerobot": metadata.version("lerobot")}


if __name__ == "__main__":
    answer = predict_errors(json.load(sys.stdin))
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
