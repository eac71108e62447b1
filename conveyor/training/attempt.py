"""One training attempt: pick the start point (fresh, local checkpoint, or archived one), run lerobot-train,
archive checkpoints as they complete, then plot and write the run manifest.

Every attempt is idempotent: a flow retry (or rerunning the same run name) lands here again and continues
from the newest complete checkpoint, ending at exactly `request.steps`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, Field

from conveyor.datasets.cache import hold
from conveyor.errors import ConveyorError
from conveyor.training import checkpoints as ck
from conveyor.training.lossplot import plot_loss
from conveyor.repo import Repo, open_repo
from conveyor.training.preflight import TrainPlan
from conveyor.training.lerobot_env import pyav_only
from conveyor.training.lerobot_train import StepMetrics, lerobot_command, run_lerobot_train

Log = Callable[[str], None]


class TrainResult(BaseModel):
    run_name: str
    output_dir: str
    requested_steps: int
    final_step: int
    started_from: int = Field(0, description="checkpoint step this attempt resumed from (0 = fresh)")
    started_from_archive: bool = False
    already_finished: bool = False
    returncode: int = 0
    log_path: str | None = None
    loss_plot: str | None = None
    archive_url: str | None = None
    archived: list[str] = Field(default_factory=list, description="checkpoint names archived by this attempt")
    last_loss: float | None = None
    seconds: float = 0.0
    path_rewrites: list[str] = Field(default_factory=list)


def versions(plan: TrainPlan) -> dict[str, str]:
    """conveyor's own packages here, and python/lerobot/torch/transformers of the environment that trains."""
    out = {}
    for pkg in ("conveyor", "prefect"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {**out, **plan.lab_versions, "lerobot": plan.lerobot.version}


def git_revision() -> str | None:
    here = Path(__file__).resolve().parents[2]
    try:
        r = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def lineage(plan: TrainPlan) -> dict:
    """What every archived checkpoint records about where it came from."""
    return {"dataset": {"root": str(plan.dataset_root), "repo_id": plan.repo_id,
                        "store": plan.repo_id.split("/", 1)[-1], "pin": f"runs/{plan.run_name}/dataset.json",
                        "version": plan.dataset_version.to_dict() if plan.dataset_version else None},
            "policy_type": plan.policy_type, "recipe": plan.recipe, "versions": versions(plan),
            "lerobot_train": str(plan.lerobot.executable), "git_revision": git_revision()}


class Archiver:
    """Uploads each checkpoint once it is complete, in a background thread so training never waits."""

    def __init__(self, objects: Repo, plan: TrainPlan, log: Log):
        self.objects, self.plan, self.log = objects, plan, log
        self.lineage = lineage(plan)
        self.done: set[str] = set(ck.archived(objects, plan.run_name))
        self.new: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-archiver", daemon=True)
        self._lock = threading.Lock()

    def sweep(self, finished: bool = False) -> None:
        with self._lock:
            for c in ck.local_checkpoints(self.plan.lerobot_dir):
                if c.name in self.done or not ck.is_complete(c, finished):
                    continue
                try:
                    ck.archive_checkpoint(self.objects, self.plan.run_name, c, self.lineage, log=self.log)
                except ConveyorError as e:
                    self.errors.append(str(e))
                    self.log(f"archive error: {e}")
                    self.done.add(c.name)          # reported at the end; the next attempt retries it
                    continue
                self.done.add(c.name)
                self.new.append(c.name)
                self.log(f"archived checkpoint {c.name} to runs/{self.plan.run_name}/checkpoints/{c.name}/")

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.sweep()

    def __enter__(self) -> "Archiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def start_point(plan: TrainPlan, objects: Repo | None, log: Log) -> tuple[ck.Checkpoint | None, bool]:
    """Newest complete checkpoint of this run, local or archived (downloaded + verified); (None, False) = fresh."""
    if plan.lerobot_dir.exists():
        ck.drop_incomplete(plan.lerobot_dir, log)
    local = ck.newest_local(plan.lerobot_dir)
    remote = ck.newest_archived(objects, plan.run_name) if objects is not None else None
    if local and (remote is None or local.step >= remote[1]):
        log(f"resuming run {plan.run_name} from local checkpoint {local.name}")
        return local, False
    if remote:
        log(f"resuming run {plan.run_name} from archived checkpoint {remote[0]}")
        metrics, key = plan.output_dir / "metrics.jsonl", ck.run_prefix(plan.run_name) + "metrics.jsonl"
        if not metrics.exists() and objects.exists(key):     # keep the loss curve whole across machines
            objects.get_file(key, metrics)
        return ck.download_checkpoint(objects, plan.run_name, remote[0], plan.lerobot_dir, log), True
    if plan.lerobot_dir.exists():              # nothing resumable in it, and lerobot refuses an existing dir
        shutil.rmtree(plan.lerobot_dir)
    return None, False


def check_same_generation(plan: TrainPlan, ckpt: ck.Checkpoint) -> None:
    """A train_config.json from before 0.6 (`eval_freq`) does not parse in 0.6 (`env_eval_freq`) and back:
    refuse to resume across that line instead of failing inside lerobot-train."""
    cfg = json.loads(ckpt.train_config.read_text())
    key = "env_eval_freq" if plan.lerobot.uses_06_names else "eval_freq"
    other = "eval_freq" if key == "env_eval_freq" else "env_eval_freq"
    if other in cfg and key not in cfg:
        era = "before 0.6" if other == "eval_freq" else "0.6 or later"
        raise ConveyorError(ckpt.train_config, f"checkpoint {ckpt.name} was written by a lerobot {era} and this "
                                               f"run's lerobot is {plan.lerobot.version}; resume it with the lerobot "
                                               "that wrote it, or start a new run_name.")


def resume_args(plan: TrainPlan, ckpt: ck.Checkpoint) -> tuple[list[str], list[str]]:
    """Rewrite stale paths inside the checkpoint, then the `--config_path ... --resume=true` arguments."""
    check_same_generation(plan, ckpt)
    saved = ck.saved_paths(ckpt)
    mapping = {saved["output_dir"] or "": str(plan.lerobot_dir), saved["dataset.root"] or "": str(plan.dataset_root)}
    if plan.vlm_model_name and saved["policy.vlm_model_name"]:
        mapping[saved["policy.vlm_model_name"]] = plan.vlm_model_name
    changes = ck.rewrite_paths(ckpt, mapping)
    req = plan.request
    args = [f"--config_path={ckpt.train_config}", "--resume=true", f"--steps={req.steps}",
            f"--save_freq={req.save_freq}", f"--log_freq={req.log_freq}", f"--num_workers={plan.num_workers}",
            f"--dataset.video_backend={plan.video_backend}"]
    return args, changes


def _append_metrics(path: Path, m: StepMetrics) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(dataclasses.asdict(m)) + "\n")


def write_run_manifest(plan: TrainPlan, result: TrainResult, objects: Repo | None, log: Log) -> None:
    """run.json (request, lineage, versions, full train config) locally and, with loss plot and logs, archived."""
    final = ck.newest_local(plan.lerobot_dir)
    train_config = json.loads(final.train_config.read_text()) if final else None
    doc = {"run": plan.run_name, "request": plan.request.model_dump(mode="json"), **lineage(plan),
           "recipe_reason": plan.recipe_reason, "final_step": result.final_step,
           "final_checkpoint": f"runs/{plan.run_name}/checkpoints/{final.name}/" if final else None,
           "train_config": train_config, "written_at": time.time()}
    (plan.output_dir / "run.json").write_text(json.dumps(doc, indent=1, default=str))
    if objects is None:
        return
    prefix = ck.run_prefix(plan.run_name)
    for f in [plan.output_dir / "run.json", plan.output_dir / "loss.png", plan.output_dir / "metrics.jsonl",
              *sorted(plan.logs_dir.glob("train-*.log"))]:
        if f.is_file():
            rel = f.relative_to(plan.output_dir).as_posix()
            objects.put_file(f, prefix + rel)
    log(f"run manifest, loss plot and logs archived under {prefix}")


def run_attempt(plan: TrainPlan, settings=None, *, log: Log = print, on_line: Log | None = None,
                on_metrics: Callable[[StepMetrics], None] | None = None,
                on_step: Callable[[int], None] | None = None) -> TrainResult:
    """One attempt of the run described by `plan`; raises ConveyorError when lerobot-train fails."""
    req = plan.request
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    objects = (open_repo(plan.archive_url, getattr(settings, "s3", None), getattr(settings, "transfer", None))
               if plan.archive_url else None)
    ckpt, from_archive = start_point(plan, objects, log)
    result = TrainResult(run_name=plan.run_name, output_dir=str(plan.output_dir), requested_steps=req.steps,
                         final_step=ckpt.step if ckpt else 0, started_from=ckpt.step if ckpt else 0,
                         started_from_archive=from_archive, archive_url=plan.archive_url)
    if ckpt and ckpt.step >= req.steps:
        result.already_finished = True
        log(f"run {plan.run_name} already finished at step {ckpt.step} (requested {req.steps})")
        args = None
    elif ckpt:
        args, result.path_rewrites = resume_args(plan, ckpt)
        for c in result.path_rewrites:
            log(f"rewrote stale path in checkpoint {ckpt.name}: {c}")
    else:
        args = plan.args
        log(f"starting run {plan.run_name} fresh ({plan.policy_type}, recipe {plan.recipe}: {plan.recipe_reason})")

    metrics_path = plan.output_dir / "metrics.jsonl"

    def metrics_cb(m: StepMetrics) -> None:
        _append_metrics(metrics_path, m)
        result.last_loss = m.loss
        if on_metrics:
            on_metrics(m)

    archiver = Archiver(objects, plan, log) if objects is not None else None
    if args is not None:
        import os

        env = {**os.environ, **plan.env}
        if plan.video_backend == "pyav":
            env = pyav_only(env)
        cmd = lerobot_command(args, plan.lerobot.executable, req.gpus)
        with hold(plan.dataset_root), (archiver or nullcontext()):  # the cached version is not evicted meanwhile
            run = run_lerobot_train(cmd, env, plan.logs_dir, batch_size=plan.batch_size, log_freq=req.log_freq,
                                    start_step=result.started_from, on_line=on_line, on_metrics=metrics_cb, on_step=on_step,
                                    pid_file=plan.output_dir / "train.pid")
        result.returncode, result.log_path, result.seconds = run.returncode, str(run.log_path), run.seconds
        newest = ck.newest_local(plan.lerobot_dir)
        result.final_step = newest.step if newest else 0
        if archiver:
            archiver.sweep(finished=run.ended_cleanly)
        png = plot_loss(metrics_path, plan.output_dir / "loss.png", f"{plan.run_name} ({plan.policy_type})")
        result.loss_plot = str(png) if png else None
        if not run.ended_cleanly:
            how = f"was killed by signal {run.signal}" if run.signal else f"exited with code {run.returncode}"
            raise ConveyorError(run.log_path, f"lerobot-train {how} at step {result.final_step} of {req.steps}; "
                                              "a retry resumes from the newest complete checkpoint.")
    elif archiver:
        archiver.sweep(finished=True)
    if archiver:
        result.archived = archiver.new
        if archiver.errors:
            raise ConveyorError(plan.archive_url, f"training finished but {len(archiver.errors)} checkpoint(s) "
                                                  f"were not archived: {archiver.errors[0]}")
    if result.final_step != req.steps and not result.already_finished:
        raise ConveyorError(plan.lerobot_dir, f"training ended at step {result.final_step}, not the requested "
                                              f"{req.steps}")
    write_run_manifest(plan, result, objects, log)
    return result
