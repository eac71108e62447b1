"""Wrapper overhead of a conveyor training run vs bare `lerobot-train` on the same tiny SmolVLA config.

Both run the identical lerobot-train arguments (from conveyor's preflight) on a store converted from a
generated recording; conveyor adds output streaming, metric parsing, the log file, a checkpoint archiver
(file://) and the loss plot. Overhead per step = (conveyor wall - bare wall) / steps; it is also shown
relative to the bare per-step time. Usage: python bench/train_overhead.py [--steps 60] [--repeats 2]
[--lerobot-train PATH] (e.g. the cached lerobot 0.4.4 venv's, to compare versions).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SVT_LOG="1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--save-freq", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lerobot-train", help="another environment's lerobot-train (default: conveyor's own)")
    a = ap.parse_args()

    from conveyor.ingest import convert
    from conveyor.settings import Settings
    from conveyor.synthetic.recording import CameraSpec, RecordingSpec, write_recording
    from conveyor.training.attempt import run_attempt
    from conveyor.training.preflight import preflight
    from conveyor.training.request import TrainRequest
    from conveyor.training.lerobot_train import lerobot_command
    from tiny_smolvlm import build_tiny_smolvlm

    work = Path(tempfile.mkdtemp(prefix="conveyor-train-bench-"))
    os.environ["HF_HOME"] = str(work / "hf")
    spec = RecordingSpec(fps=10, cameras=(CameraSpec("observation.images.cam", height=48, width=64, codec="h264"),))
    convert(write_recording(work / "rec", episodes=3, lengths=20, tasks="抓取方块", spec=spec), work / "stores/grasp")
    vlm = build_tiny_smolvlm(work / "vlm")
    settings = Settings(store_root=work / "stores", work_dir=work / "work", storage_url=f"file://{work / 'objects'}",
                        training={"lerobot_train": a.lerobot_train})
    opts = {"policy.load_vlm_weights": False, "policy.num_vlm_layers": 2, "policy.resize_imgs_with_padding": "[64,64]",
            "policy.chunk_size": 5, "policy.n_action_steps": 5}
    bare, wrapped = [], []
    for i in range(a.repeats):
        req = TrainRequest(store="grasp", policy_type="smolvla", vlm_model_name=str(vlm), device="cpu", batch_size=2,
                           num_workers=0, log_freq=1, steps=a.steps, save_freq=a.save_freq, run_name=f"bench{i}",
                           options=opts)
        plan = preflight(req, settings, run_name=req.run_name)
        args = [x if not x.startswith("--output_dir=") else f"--output_dir={work / f'bare{i}'}" for x in plan.args]
        t0 = time.perf_counter()
        subprocess.run(lerobot_command(args, plan.lerobot.executable), env={**os.environ, **plan.env}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_attempt(plan, settings, log=lambda m: None, on_line=lambda m: None)
        wrapped.append(time.perf_counter() - t0)
        print(f"repeat {i}: bare {bare[-1]:.2f} s, conveyor {wrapped[-1]:.2f} s", flush=True)
    b, w = statistics.median(bare), statistics.median(wrapped)
    per_step = (w - b) / a.steps
    print(f"lerobot {plan.lerobot.version}, steps {a.steps}, save_freq {a.save_freq}: bare median {b:.2f} s "
          f"({b / a.steps * 1000:.0f} ms/step incl. startup), conveyor median {w:.2f} s; overhead {per_step * 1000:+.1f} ms/step "
          f"({(w - b) / b * 100:+.1f} % of the bare run)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
