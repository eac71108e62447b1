"""The training request: one pydantic model that is the Prefect UI form, the CLI's target and the flow input.

Field titles and descriptions are what the form shows: written for the person filling it in.
"""
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


def _no_toggle(kind: str):
    """JSON schema for an optional field as a plain input: Prefect's form shows `anyOf [T, null]` behind a
    type toggle; an empty input means "not set". No `default` either: Prefect's parameter validation adds
    `null` to the type of a property without one (and refuses `null` where a default is given)."""
    def fix(schema: dict) -> None:
        schema.pop("anyOf", None)
        schema.pop("default", None)
        schema["type"] = kind
    return fix


def _known_stores(schema: dict) -> None:
    """Name the stores in the form's store field: the configured sources' stores and those under store_root
    when the schema is made, i.e. when `conveyor up` (or `prefect deploy`) registers the deployment."""
    try:
        from conveyor.settings import load_settings
        from conveyor.stores import known_stores

        settings = load_settings()
        names = {s.name for s in settings.sources} | set(known_stores(settings.store_root))
    except Exception:  # noqa: BLE001 - no settings here: the description alone
        return
    if names:
        schema["description"] += f" Known stores: {', '.join(sorted(names))}."
        schema["examples"] = sorted(names)


class TrainRequest(BaseModel):
    """What to train, on which data, and where the checkpoints go."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(
        title="Store", json_schema_extra=_known_stores,
        description="The dataset to train on: a store name (a folder under store_root, e.g. `koch_grasp`) or "
                    "the path of a LeRobot v3.0 dataset folder on the training machine.")
    dataset_version: str | None = Field(
        None, title="Dataset version", json_schema_extra=_no_toggle("string"),
        description="Pin the run to one dataset version: its commit number (e.g. `12`) or content-hash "
                    "prefix. The run is refused if the store has moved past it. Empty: the current version.")
    policy_type: PolicyType = Field(
        "smolvla", title="Policy type",
        description="Policy to train from scratch: smolvla, act, diffusion or pi0. Ignored when a pretrained "
                    "policy folder is given.")
    policy_path: str | None = Field(
        None, title="Pretrained policy folder", json_schema_extra=_no_toggle("string"),
        description="A local pretrained policy folder to fine-tune, e.g. a downloaded smolvla_base or a "
                    "checkpoint's `pretrained_model` folder. Runs are offline: Hugging Face Hub ids are refused.")
    vlm_model_name: str | None = Field(
        None, title="VLM model name", json_schema_extra=_no_toggle("string"),
        description="SmolVLA only: a local folder with the SmolVLM backbone (config, tokenizer, processor). "
                    "Empty: the one named in the pretrained policy's config.")
    recipe: Recipe = Field(
        "auto", title="Memory recipe",
        description="light (GPUs up to 12 GB): 384x384 images, chunk size 10, batch 8, mixed precision. "
                    "standard (24 GB and more): lerobot defaults, batch 16. auto picks from free GPU memory; "
                    "on CPU it picks a smoke-run recipe (batch 4, no data loader workers).")
    device: Device = Field("cuda", title="Device", description="cuda trains on the GPU; cpu is for smoke tests.")
    gpus: int = Field(1, ge=1, le=16, title="GPUs",
                      description="Number of GPUs; more than 1 runs `accelerate launch`.")
    steps: int = Field(20_000, ge=1, title="Steps",
                       description="Training ends at exactly this step, also after resuming.")
    batch_size: int | None = Field(None, ge=1, title="Batch size", json_schema_extra=_no_toggle("integer"),
                                   description="Per-GPU batch size. Empty: the recipe's.")
    save_freq: int = Field(5_000, ge=1, title="Checkpoint every N steps",
                           description="Save (and archive) a checkpoint every N steps.")
    log_freq: int = Field(100, ge=1, title="Log every N steps",
                          description="Log loss, gradient norm and learning rate every N steps.")
    seed: int = Field(1000, title="Seed", description="Random seed.")
    num_workers: int | None = Field(None, ge=0, le=64, title="Data loader workers",
                                    json_schema_extra=_no_toggle("integer"),
                                    description="Processes that decode video and load batches, at most the "
                                                "cores the run has. Empty: the recipe's (4 on a GPU, 0 on CPU).")
    run_name: str | None = Field(
        None, pattern=RUN_NAME, title="Run name", json_schema_extra=_no_toggle("string"),
        description="Name of the run: its folder and its prefix in object storage. Reusing a name continues "
                    "that run from its newest complete checkpoint. Empty: policy, store and the flow run id, "
                    "e.g. `act-koch_grasp-1a2b3c4d`.")
    output_dir: str | None = Field(
        None, title="Output folder", json_schema_extra=_no_toggle("string"),
        description="Run folder on the training machine. Empty: `runs/RUN_NAME` under the work folder.")
    archive: bool = Field(True, title="Archive checkpoints",
                          description="Upload every complete checkpoint to object storage "
                                      "(`runs/RUN_NAME/checkpoints/STEP/`) so another machine can resume the run.")
    archive_url: str | None = Field(
        None, title="Archive URL", json_schema_extra=_no_toggle("string"),
        description="Object storage for checkpoints: `file:///path` or `s3://bucket/prefix`. "
                    "Empty: storage_url from conveyor.toml.")
    options: dict[str, OptionValue] = Field(
        default_factory=dict, title="Extra lerobot-train options",
        description="lerobot-train options without the leading `--`, e.g. "
                    "{\"policy.optimizer_lr\": 5e-5, \"policy.freeze_vision_encoder\": false}. "
                    "They override the recipe. Options conveyor sets itself are refused.")

    @field_validator("policy_path", "vlm_model_name", "run_name", "output_dir", "archive_url", "batch_size",
                     "num_workers", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if v == "" else v     # an input cleared in the UI form

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
