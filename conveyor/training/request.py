"""The training request: one pydantic model that is the Prefect UI form, the CLI's target and the flow input."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PolicyType = Literal["smolvla", "act", "diffusion", "pi0"]
Recipe = Literal["auto", "light", "standard"]
Device = Literal["cuda", "cpu"]
OptionValue = str | int | float | bool | None

RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_OPTION_KEY = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")


class TrainRequest(BaseModel):
    """Everything a training run needs; field descriptions are what the UI shows next to each input."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(
        description="Dataset to train on: a store name from conveyor settings (folder under store_root) "
                    "or the path of a LeRobot v3.0 dataset folder on the worker.")
    dataset_version: str | None = Field(
        None, description="Pin the run to a dataset version: its commit number (e.g. `12`) or content-hash "
                          "prefix. The run is refused if the store has moved past it. Empty = current version.")
    policy_type: PolicyType = Field(
        "smolvla", description="Policy to train from scratch (smolvla, act, diffusion or pi0). "
                               "Ignored when policy_path is set.")
    policy_path: str | None = Field(
        None, description="Local pretrained policy folder to fine-tune (e.g. a downloaded smolvla_base, or "
                          "`<run>/checkpoints/<step>/pretrained_model`). Runs are offline: Hub ids are refused.")
    vlm_model_name: str | None = Field(
        None, description="SmolVLA only: local folder of the SmolVLM backbone (config, tokenizer, processor). "
                          "Empty = the one named in policy_path's config.")
    recipe: Recipe = Field(
        "auto", description="Memory recipe. light (<= 12 GB): 384x384 images, chunk_size 10, batch 8, AMP. "
                            "standard (>= 24 GB): lerobot defaults, batch 16. auto picks from free GPU memory.")
    device: Device = Field("cuda", description="cuda for the GPU pool; cpu only for smoke tests.")
    gpus: int = Field(1, ge=1, le=16, description="GPUs to use; more than 1 runs `accelerate launch`.")
    steps: int = Field(20_000, ge=1, description="Training ends at exactly this step (also after resumes).")
    batch_size: int | None = Field(None, ge=1, description="Per-GPU batch size. Empty = the recipe's.")
    save_freq: int = Field(5_000, ge=1, description="Save (and archive) a checkpoint every N steps.")
    log_freq: int = Field(100, ge=1, description="Log loss, grad norm and lr every N steps.")
    seed: int = Field(1000, description="Random seed passed to lerobot-train.")
    num_workers: int = Field(4, ge=0, le=64, description="DataLoader worker processes.")
    run_name: str | None = Field(
        None, pattern=RUN_NAME,
        description="Name of the run (its folder and archive prefix). Reusing a name continues that run "
                    "from its newest complete checkpoint. Empty = `<policy>-<store>-<flow run id>`.")
    output_dir: str | None = Field(
        None, description="Run folder on the worker. Empty = `<work_dir>/runs/<run_name>`.")
    archive: bool = Field(True, description="Upload every complete checkpoint to object storage "
                                            "(`runs/<run>/checkpoints/<step>/`) so another machine can resume.")
    archive_url: str | None = Field(
        None, description="Object storage for checkpoints (`file:///...` or `s3://bucket/prefix`). "
                          "Empty = settings.storage_url.")
    options: dict[str, OptionValue] = Field(
        default_factory=dict,
        description="Extra lerobot-train options without the leading `--`, e.g. "
                    "{\"policy.optimizer_lr\": 5e-5, \"policy.freeze_vision_encoder\": false}. "
                    "They override the recipe. Options conveyor sets itself are refused.")

    @field_validator("dataset_version", mode="before")
    @classmethod
    def _version_text(cls, v):
        return None if v in (None, "") else str(v)     # a trigger may fill in the commit number as an int

    @field_validator("options", mode="before")
    @classmethod
    def _strip_dashes(cls, v):
        if isinstance(v, dict):
            return {str(k).removeprefix("--"): val for k, val in v.items()}
        return v

    @field_validator("options")
    @classmethod
    def _keys(cls, v: dict[str, OptionValue]) -> dict[str, OptionValue]:
        for k in v:
            if not _OPTION_KEY.match(k):
                raise ValueError(f"`{k}` is not a lerobot option name (dotted lower-case, e.g. policy.use_amp)")
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("store must name a store or a dataset folder")
        return v.strip()


def default_run_name(request: TrainRequest, suffix: str) -> str:
    """`<policy>-<store>-<suffix>` ("finetune" for a policy_path): the UI's and the CLI's default run name."""
    policy = "finetune" if request.policy_path else request.policy_type
    return f"{policy}-{request.store.rstrip('/').split('/')[-1] or 'store'}-{suffix}"


def parse_set_options(items: list[str]) -> dict[str, OptionValue]:
    """`--set a.b=value` strings -> options; values stay strings (lerobot's own parser types them)."""
    out: dict[str, OptionValue] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"`--set {item}` needs the form option=value")
        out[key.strip().removeprefix("--")] = value
    return out
