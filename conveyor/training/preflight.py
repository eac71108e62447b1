"""Everything that can be checked before GPU time is spent; each refusal is one sentence naming the fix.

The result is a `TrainPlan`: resolved paths, recipe, the exact lerobot-train arguments of a fresh start and
the child's environment. The plan is plain data so it can travel between Prefect tasks and be shown.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from conveyor.datasets.resolve import record_pin, resolve_dataset
from conveyor.errors import ConveyorError
from conveyor.version import DatasetVersion
from conveyor.training import lerobot_env
from conveyor.training.lerobot_env import OFFLINE_ENV, LerobotEnv
from conveyor.training.recipes import choose_recipe, min_free_gib
from conveyor.training.request import OptionValue, TrainRequest

HUB_VLM = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"

# option -> the one sentence that explains why it is refused ({version}: the lab environment's lerobot)
REFUSED = {
    "dataset.single_task": "`--dataset.single_task` is not a lerobot-train option in {version}; set the task at "
                           "ingest.",
    "optimizer.gradient_accumulation_steps": "`--optimizer.gradient_accumulation_steps` does not exist in "
                                             "lerobot {version}; lower batch_size or use the light recipe instead.",
    "save_checkpoint_to_hub": "`--save_checkpoint_to_hub` pushes to the Hugging Face Hub and runs are offline; "
                              "checkpoints are archived to object storage instead.",
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
REFUSED_PREFIXES = {
    "job.": "`--job.*` runs lerobot-train on Hugging Face Jobs; conveyor runs it on its own work pool.",
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
    num_workers: int = 0        # data loader workers: the request's or the recipe's, at most the cores here
    video_backend: str
    free_gib: float | None = None
    lerobot: LerobotEnv         # which lerobot-train, which lerobot version
    lab_versions: dict[str, str] = {}   # python/lerobot/torch/transformers of that environment
    option_notes: list[str] = []        # options passed under the name the lab's lerobot knows
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


def _fast_validation(root: Path, version: str) -> str | None:
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
        return f"codebase_version is {meta.get('codebase_version')!r}, lerobot {version} trains on v3.0"
    if not meta.get("total_episodes"):
        return "the dataset has no episodes"
    return None


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


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


def check_options(options: dict[str, OptionValue], version: str) -> None:
    for key, value in options.items():
        if key in REFUSED and not (key == "wandb.enable" and value in (False, "false")):
            raise refuse(f"--{key}", REFUSED[key].format(version=version))
        for prefix, sentence in REFUSED_PREFIXES.items():
            if key.startswith(prefix):
                raise refuse(f"--{key}", sentence)
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


def versioned_options(options: dict[str, OptionValue], env: LerobotEnv) -> tuple[dict[str, OptionValue], list[str]]:
    """The request's options under the names the lab's lerobot knows (0.6 renamed `eval_freq`), with a note
    for each renamed one; RA-BC options that changed shape between 0.4.4 and 0.6 are refused."""
    out, notes = {}, []
    renames = lerobot_env.RENAMED_IN_06 if env.uses_06_names \
        else {new: old for old, new in lerobot_env.RENAMED_IN_06.items()}
    for key, value in options.items():
        if env.uses_06_names and key in lerobot_env.RABC_044:
            raise refuse(f"--{key}", f"`--{key}` is `--sample_weighting.*` (type=rabc) in lerobot {env.version}; "
                                     "use those options.")
        if not env.uses_06_names and key.startswith("sample_weighting."):
            raise refuse(f"--{key}", f"`--{key}` does not exist in lerobot {env.version}; use its `use_rabc` and "
                                     "`rabc_*` options.")
        if key in renames:
            notes.append(f"`{key}` is `{renames[key]}` in lerobot {env.version}: passed as `{renames[key]}`")
            key = renames[key]
        out[key] = value
    return out, notes


def _backbone_weights(policy: dict | None, hub_checkpoints: str, policy_path: Path | None,
                      options: dict[str, OptionValue]) -> None:
    """A default ImageNet backbone (ACT; Diffusion since 0.6) comes from download.pytorch.org: refuse unless
    it is in the torch cache of the lab's environment."""
    weights = (policy or {}).get("pretrained_backbone_weights")
    if not weights or policy_path or "policy.pretrained_backbone_weights" in options:
        return
    arch = weights.split("_Weights")[0].lower()           # ResNet18_Weights.IMAGENET1K_V1 -> resnet18
    if not any(Path(hub_checkpoints).glob(f"{arch}-*.pth")):
        raise refuse(hub_checkpoints, f"{policy['type']}'s default ImageNet backbone ({weights}) is not in the "
                                      "torch cache and runs are offline; cache it, or set option "
                                      "policy.pretrained_backbone_weights=null to train the backbone from scratch.")


def build_args(*, repo_id: str, root: Path, vb: str | None, policy_type: str, policy_path: Path | None,
               vlm: str | None, device: str, lerobot_dir: Path, run_name: str, req: TrainRequest,
               batch_size: int, num_workers: int, recipe_options: dict[str, OptionValue],
               options: dict[str, OptionValue]) -> list[str]:
    opts: dict[str, OptionValue] = {"dataset.repo_id": repo_id, "dataset.root": str(root)}
    if vb:
        opts["dataset.video_backend"] = vb
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
                 "seed": req.seed, "num_workers": num_workers, "wandb.enable": False})
    opts.update(recipe_options)
    opts.update(options)               # the user's word last
    return [f"--{k}={fmt_value(v)}" for k, v in opts.items()]


def preflight(req: TrainRequest, settings, *, run_name: str, cuda_probe=gpu_free_gib, log=print) -> TrainPlan:
    """Resolve and check `req` on this machine; raise ConveyorError with one sentence on the first problem."""
    env = lerobot_env.resolve(settings)
    check_options(req.options, env.version)
    options, notes = versioned_options(req.options, env)
    output_dir = Path(req.output_dir).expanduser().resolve() if req.output_dir \
        else (settings.work_dir / "runs" / run_name).resolve()
    archive_url = (req.archive_url or settings.storage_url) if req.archive else None
    ds = resolve_dataset(req.store, req.dataset_version, settings, run=run_name, run_dir=output_dir,
                         archive_url=archive_url, log=log)
    root, version = ds.root, ds.version
    problem = _fast_validation(root, env.version)
    if problem:
        raise refuse(root, f"the dataset fails fast validation ({problem}); run `conveyor validate {root}`.")

    policy_type, policy_path = _policy(req)
    vlm = _vlm(req, policy_type, policy_path)

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

    repo_id = "local/" + (re.sub(r"[^A-Za-z0-9._-]", "_", ds.store) or "dataset")
    lerobot_dir = output_dir / "lerobot"
    args = dict(repo_id=repo_id, root=root, policy_type=policy_type, policy_path=policy_path, vlm=vlm,
                device=req.device, lerobot_dir=lerobot_dir, run_name=run_name, req=req,
                batch_size=recipe.batch_size, num_workers=recipe.num_workers, recipe_options=recipe.options,
                options=options)
    # lerobot's own parser and validate(), in the lab's environment, on a probe output dir (must not exist)
    probe_dir = _existing_parent(output_dir) / f".conveyor-preflight-{os.getpid()}-does-not-exist"
    answer = lerobot_env.probe(env, build_args(vb=None, **{**args, "lerobot_dir": probe_dir}), OFFLINE_ENV)
    if answer["error"]:
        raise refuse("options", f"the options do not parse as a lerobot {env.version} train config: "
                                f"{answer['error']}")
    _backbone_weights(answer["policy"], answer["torch_hub_checkpoints"], policy_path, req.options)
    vb = str(options.get("dataset.video_backend") or answer["video_backend"])
    record_pin(ds, settings, run_dir=output_dir, archive_url=archive_url, log=log)

    return TrainPlan(request=req, run_name=run_name, output_dir=output_dir, lerobot_dir=lerobot_dir,
                     dataset_root=root, repo_id=repo_id, dataset_version=version, dataset_bytes=size,
                     policy_type=policy_type, vlm_model_name=vlm, recipe=recipe.name,
                     recipe_reason=recipe.reason, batch_size=recipe.batch_size,
                     num_workers=recipe.num_workers, video_backend=vb, free_gib=free,
                     lerobot=env, lab_versions=answer["versions"], option_notes=notes,
                     args=build_args(vb=vb, **args), env=dict(OFFLINE_ENV), archive_url=archive_url)
