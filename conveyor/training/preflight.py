"""Everything that can be checked before GPU time is spent; each refusal is one sentence naming the fix.

The result is a `TrainPlan`: resolved paths, recipe, the exact lerobot-train arguments of a fresh start and
the child's environment. The plan is plain data so it can travel between Prefect tasks and be shown.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from conveyor.datasets.resolve import record_pin, resolve_dataset
from conveyor.errors import ConveyorError
from conveyor.models import DatasetVersion
from conveyor.training.recipes import choose_recipe, min_free_gib
from conveyor.training.request import OptionValue, TrainRequest

HUB_VLM = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "SVT_LOG": "1", "WANDB_MODE": "disabled"}

# option -> the one sentence that explains why it is refused
REFUSED = {
    "dataset.single_task": "`--dataset.single_task` is not a lerobot-train option in 0.4.4; set the task at ingest.",
    "optimizer.gradient_accumulation_steps": "`--optimizer.gradient_accumulation_steps` does not exist in "
                                             "lerobot 0.4.4; lower batch_size or use the light recipe instead.",
    "dataset.repo_id": "`--dataset.repo_id` is set by conveyor from the store; choose the dataset with `store`.",
    "dataset.root": "`--dataset.root` is set by conveyor from the store; choose the dataset with `store`.",
    "output_dir": "`--output_dir` is set by conveyor; use the request's `output_dir` field.",
    "resume": "`--resume` is decided by conveyor from the run's checkpoints; rerun with the same run_name to resume.",
    "config_path": "`--config_path` is decided by conveyor from the run's checkpoints; rerun with the same "
                   "run_name to resume.",
    "policy.type": "`--policy.type` is set from the request; use the `policy_type` field.",
    "policy.path": "`--policy.path` is set from the request; use the `policy_path` field.",
    "policy.device": "`--policy.device` is set from the request; use the `device` field.",
    "policy.vlm_model_name": "`--policy.vlm_model_name` is set from the request; use the `vlm_model_name` field.",
    "job_name": "`--job_name` is set by conveyor to the run name; use the `run_name` field.",
    "wandb.enable": "wandb is not available: runs are offline; use the run's logs and loss plot instead.",
}
for _f in ("steps", "batch_size", "save_freq", "log_freq", "seed", "num_workers"):
    REFUSED[_f] = f"`--{_f}` is set from the request; use the `{_f}` field."


class TrainPlan(BaseModel):
    """A request resolved on this machine: what exactly will run."""

    request: TrainRequest
    run_name: str
    output_dir: Path            # the run folder: logs/, loss.png, run.json, lerobot/
    lerobot_dir: Path           # lerobot-train's --output_dir (checkpoints/ live here)
    dataset_root: Path
    repo_id: str
    dataset_version: DatasetVersion | None = None
    dataset_bytes: int = 0
    policy_type: str
    vlm_model_name: str | None = None
    recipe: str
    recipe_reason: str
    batch_size: int
    video_backend: str
    free_gib: float | None = None
    args: list[str]             # lerobot-train arguments of a fresh start
    env: dict[str, str]         # added to the child's environment
    archive_url: str | None = None

    @property
    def logs_dir(self) -> Path:
        return self.output_dir / "logs"


def refuse(path: Any, sentence: str) -> ConveyorError:
    return ConveyorError(path, sentence)


def fmt_value(v: OptionValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return str(v)


def _fast_validation(root: Path) -> str | None:
    """First failure of the store's fast validation (a plain v3.0 folder gets basic checks), else None."""
    from conveyor.store import is_store
    from conveyor.validate import validate_fast

    if is_store(root):
        report = validate_fast(root)
        if not report.ok:
            f = report.failures[0]
            return f"{f.name}: {f.detail}" if f.detail else f.name
        return None
    info = root / "meta" / "info.json"
    try:
        meta = json.loads(info.read_text())
    except (OSError, ValueError):
        return "meta/info.json is missing or not JSON"
    if meta.get("codebase_version") != "v3.0":
        return f"codebase_version is {meta.get('codebase_version')!r}, lerobot 0.4.4 trains on v3.0"
    if not meta.get("total_episodes"):
        return "the dataset has no episodes"
    return None


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def video_backend() -> str:
    """torchcodec only when it really loads (it needs FFmpeg's shared libraries), else pyav."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
        return "torchcodec"
    except Exception:  # noqa: BLE001 -- ImportError or RuntimeError("Could not load libtorchcodec")
        return "pyav"


def gpu_free_gib(gpus: int) -> tuple[bool, float | None, int]:
    """(CUDA usable, smallest free memory among the first `gpus` devices in GiB, device count)."""
    import torch

    if not torch.cuda.is_available():
        return False, None, 0
    n = torch.cuda.device_count()
    free = [torch.cuda.mem_get_info(i)[0] / 2**30 for i in range(min(n, gpus))]
    return True, min(free), n


def _local_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def check_options(options: dict[str, OptionValue]) -> None:
    for key, value in options.items():
        if key in REFUSED and not (key == "wandb.enable" and value in (False, "false")):
            raise refuse(f"--{key}", REFUSED[key])
    push = str(options.get("policy.push_to_hub", "false")).lower() == "true"
    if push and not options.get("policy.repo_id"):
        raise refuse("--policy.push_to_hub", "`policy.push_to_hub=true` needs `policy.repo_id`; set one or "
                                             "leave push_to_hub off (conveyor's default).")


def _policy(req: TrainRequest) -> tuple[str, Path | None]:
    if not req.policy_path:
        return req.policy_type, None
    p = Path(req.policy_path).expanduser()
    cfg = _local_config(p)
    if not p.is_dir() or not cfg:
        raise refuse(req.policy_path, "policy_path is not a local pretrained policy folder with a config.json; "
                                      "runs are offline (HF_HUB_OFFLINE=1), download it to the worker first.")
    return str(cfg.get("type") or req.policy_type), p.resolve()


def _vlm(req: TrainRequest, policy_type: str, policy_path: Path | None) -> str | None:
    if policy_type != "smolvla":
        return None
    name = req.vlm_model_name or (_local_config(policy_path).get("vlm_model_name") if policy_path else None) \
        or HUB_VLM
    p = Path(name).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise refuse(name, "`vlm_model_name` is not a local SmolVLM folder (config, tokenizer, processor); runs "
                           "are offline (HF_HUB_OFFLINE=1), so download it and set vlm_model_name to the folder.")
    return str(p.resolve())


def _backbone_weights(policy_type: str, policy_path: Path | None, options: dict[str, OptionValue]) -> None:
    """ACT's default ImageNet ResNet18 weights come from download.pytorch.org: refuse unless cached."""
    if policy_type != "act" or policy_path or "policy.pretrained_backbone_weights" in options:
        return
    import torch

    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(ckpt_dir.glob("resnet18-*.pth")):
        raise refuse(ckpt_dir, "ACT's default ImageNet backbone (ResNet18_Weights.IMAGENET1K_V1) is not in the "
                               "torch cache and runs are offline; cache it, or set option "
                               "policy.pretrained_backbone_weights=null to train the backbone from scratch.")


def build_args(*, repo_id: str, root: Path, vb: str, policy_type: str, policy_path: Path | None,
               vlm: str | None, device: str, lerobot_dir: Path, run_name: str, req: TrainRequest,
               batch_size: int, recipe_options: dict[str, OptionValue]) -> list[str]:
    opts: dict[str, OptionValue] = {"dataset.repo_id": repo_id, "dataset.root": str(root),
                                    "dataset.video_backend": vb}
    if policy_path:
        opts["policy.path"] = str(policy_path)
    else:
        opts["policy.type"] = policy_type
    opts["policy.device"] = device
    opts["policy.push_to_hub"] = False
    if vlm:
        opts["policy.vlm_model_name"] = vlm
    opts.update({"output_dir": str(lerobot_dir), "job_name": run_name, "steps": req.steps,
                 "batch_size": batch_size, "save_freq": req.save_freq, "log_freq": req.log_freq,
                 "seed": req.seed, "num_workers": req.num_workers, "wandb.enable": False})
    opts.update(recipe_options)
    opts.update(req.options)           # the user's word last
    return [f"--{k}={fmt_value(v)}" for k, v in opts.items()]


def parse_train_config(args: list[str]):
    """Parse + validate exactly as `lerobot-train` would (its draccus parser, its `validate()`).

    `validate()` reads `sys.argv` (for --policy.path / --config_path), so argv is swapped for the call.
    """
    import lerobot.policies  # noqa: F401 -- registers the policy config choices (--policy.type=...)
    from lerobot.configs import parser
    from lerobot.configs.train import TrainPipelineConfig

    def _parse(cfg):
        cfg.validate()
        return cfg

    _parse.__annotations__ = {"cfg": TrainPipelineConfig}   # parser.wrap reads the real type, not a string
    saved = sys.argv
    err = io.StringIO()
    sys.argv = ["lerobot-train", *args]
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            return parser.wrap()(_parse)()
    except SystemExit:
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        raise ValueError(lines[-1] if lines else "invalid arguments") from None
    finally:
        sys.argv = saved


def preflight(req: TrainRequest, settings, *, run_name: str, cuda_probe=gpu_free_gib, log=print) -> TrainPlan:
    """Resolve and check `req` on this machine; raise ConveyorError with one sentence on the first problem."""
    check_options(req.options)
    output_dir = Path(req.output_dir).expanduser().resolve() if req.output_dir \
        else (settings.work_dir / "runs" / run_name).resolve()
    archive_url = (req.archive_url or settings.storage_url) if req.archive else None
    ds = resolve_dataset(req.store, req.dataset_version, settings, run=run_name, run_dir=output_dir,
                         archive_url=archive_url, log=log)
    root, version = ds.root, ds.version
    problem = _fast_validation(root)
    if problem:
        raise refuse(root, f"the dataset fails fast validation ({problem}); run `conveyor validate {root}`.")

    policy_type, policy_path = _policy(req)
    vlm = _vlm(req, policy_type, policy_path)
    _backbone_weights(policy_type, policy_path, req.options)

    free = None
    if req.device == "cuda":
        ok, free, count = cuda_probe(req.gpus)
        if not ok:
            raise refuse("device=cuda", "CUDA was requested but is not available on this machine; run on the "
                                        "`gpu` work pool or set device=cpu.")
        if count < req.gpus:
            raise refuse("gpus", f"{req.gpus} GPUs were requested but this machine has {count}.")
    recipe = choose_recipe(req, policy_type, free)
    if free is not None and free < min_free_gib(recipe.name):
        raise refuse("device=cuda", f"recipe {recipe.name} needs about {min_free_gib(recipe.name):.0f} GiB of "
                                    f"free GPU memory but only {free:.1f} GiB are free; "
                                    + ("use recipe light or auto." if recipe.name == "standard"
                                       else "free the GPU or use a larger one."))

    size = _tree_bytes(root)
    free_disk = shutil.disk_usage(_existing_parent(output_dir)).free
    if free_disk < 2 * size:
        raise refuse(output_dir, f"only {free_disk / 1e9:.1f} GB free here, training needs at least twice the "
                                 f"dataset ({2 * size / 1e9:.1f} GB); free disk or choose another output_dir.")

    vb = str(req.options.get("dataset.video_backend") or video_backend())
    repo_id = "local/" + (re.sub(r"[^A-Za-z0-9._-]", "_", ds.store) or "dataset")
    lerobot_dir = output_dir / "lerobot"
    args = build_args(repo_id=repo_id, root=root, vb=vb, policy_type=policy_type, policy_path=policy_path,
                      vlm=vlm, device=req.device, lerobot_dir=lerobot_dir, run_name=run_name, req=req,
                      batch_size=recipe.batch_size, recipe_options=recipe.options)
    probe_dir = _existing_parent(output_dir) / f".conveyor-preflight-{os.getpid()}-does-not-exist"
    try:
        parse_train_config([a if not a.startswith("--output_dir=") else f"--output_dir={probe_dir}" for a in args])
    except Exception as e:  # noqa: BLE001 -- any parse/validate error is a refusal, in lerobot's words
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise refuse("options", f"the options do not parse as a lerobot 0.4.4 train config: {msg}") from None
    record_pin(ds, settings, run_dir=output_dir, archive_url=archive_url, log=log)

    return TrainPlan(request=req, run_name=run_name, output_dir=output_dir, lerobot_dir=lerobot_dir,
                     dataset_root=root, repo_id=repo_id, dataset_version=version, dataset_bytes=size,
                     policy_type=policy_type, vlm_model_name=vlm, recipe=recipe.name,
                     recipe_reason=recipe.reason, batch_size=recipe.batch_size, video_backend=vb, free_gib=free,
                     args=args, env=dict(OFFLINE_ENV),
                     archive_url=archive_url)
