"""conveyor's one settings model: `conveyor.toml` + `CONVEYOR_*` environment variables.

Relative paths resolve against the folder of the config file (or the working directory when there is
none), so a config can be moved together with its data.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from conveyor import sizing
from conveyor.errors import ConveyorError

CONFIG_ENV = "CONVEYOR_CONFIG"
DEFAULT_CONFIG = Path("conveyor.toml")


class _Table(BaseModel):
    """A `[table]` of conveyor.toml: an unknown key is a typo, refused (a lab must not run on defaults it never
    chose)."""

    model_config = ConfigDict(extra="forbid")


class SourceSettings(_Table):
    """A recording folder the recorder writes into; its store is `<store_root>/<name>`."""

    name: str = Field(description="store name (folder under store_root; conveyor/stores.py's name rule)")
    path: Path = Field(description="v2.1 dataset folder the recorder writes into, a v3.0 dataset (a lerobot 0.6 "
                                   "session), or a folder whose subfolders are v3.0 session datasets")
    task: str | None = Field(None, description="task text for episodes recorded without one")

    @field_validator("name")
    @classmethod
    def _store_name(cls, v: str) -> str:
        from conveyor.stores import NAME_RULE, name_problem

        if name_problem(v):
            raise ValueError(f"not a valid store name ({name_problem(v)}): use {NAME_RULE}")
        return v


class S3Settings(_Table):
    """Where `s3://` URLs go. Unset fields fall back to boto3's own chain (env, profile, instance role)."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    profile: str | None = None
    aws_credentials_block: str | None = Field(None, description="name of a prefect-aws AwsCredentials block")


class TransferSettings(_Table):
    """boto3 TransferConfig knobs."""

    multipart_threshold_mb: int = 16
    multipart_chunksize_mb: int = 16
    max_concurrency: int = 8


class BackupSettings(_Table):
    cron: str = "30 3 * * *"
    keep_daily: int = Field(7, ge=1)
    keep_weekly: int = Field(4, ge=0)
    verify_sample: int = Field(16, ge=0, description="objects re-read after each backup")
    include_sources: bool = Field(True, description="also back up the raw v2.1 recordings")


class ScrubSettings(_Table):
    """Nightly scrub: every committed file re-read against its sha256 (see `conveyor.scrub`)."""

    enabled: bool = True
    repair: bool | None = Field(None, description="heal damaged files from storage_url's snapshots; "
                                                   "default (unset): when the repository holds a snapshot")
    workers: int = Field(2, ge=1, description="hashing threads")


class DatasetsSettings(_Table):
    """Published dataset versions (`conveyor publish`, `conveyor datasets`)."""

    keep_days: int = Field(30, ge=0, description="published versions younger than this are kept; older ones go, "
                                                 "except each store's newest and any pinned by an unfinished run")


class ScheduleSettings(_Table):
    nightly_cron: str = "0 2 * * *"
    timezone: str = "UTC"


class WatchSettings(_Table):
    settle_seconds: float = Field(1.0, ge=0, description="file sizes must be stable this long")
    debounce_seconds: float = Field(0.3, ge=0)
    rescan_seconds: float = Field(60.0, gt=0, description="periodic full rescan for missed events")


class TrainTriggerSettings(_Table):
    """When ingest launches the `train` deployment."""

    policy: Literal["off", "every_n", "nightly"] = "off"
    every_n: int = Field(50, ge=1, description="new episodes between trainings (policy every_n)")
    deployment: str = "train/train"
    lerobot_train: Path | None = Field(None, description=(
        "the `lerobot-train` executable runs use (e.g. the lab's own environment on the GPU machine; "
        "relative to the config file); empty = the one next to conveyor's interpreter"))
    parameters: dict[str, Any] = Field(default_factory=lambda: {"request": {"store": "{store}",
                                                                         "dataset_version": "{content_hash}"}},
                                       description=(
        "parameters of the training run; string values may use {store}, {store_path}, {commit}, "
        "{commit_id}, {content_hash}, {total_episodes}, {total_frames} (see conveyor.trigger); "
        "the default pins the `train` flow's request to the store and the version just committed"))


def default_machine() -> str:
    """The host name, cut to what a Prefect deployment and work queue name may hold."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname().split(".")[0]).strip("-") or "conveyor"


class PrefectSettings(_Table):
    api_url: str | None = Field(None, description="shared Prefect server; None = `conveyor up` starts one")
    host: str = "127.0.0.1"
    port: int = Field(4200, ge=1, le=65535)
    home: Path = Field(Path(".prefect"), description="PREFECT_HOME of the local server (SQLite lives here)")
    worker_query_seconds: float = Field(2.0, gt=0, description="how often `conveyor up`'s workers poll")
    machine: str = Field(default_factory=default_machine, pattern=r"^[A-Za-z0-9._-]+$",
                         description="this machine's name on a shared Prefect server: `conveyor up` registers the "
                                     "cpu flows as deployments `<flow>/<flow> on <machine>` on work queue `<machine>` of "
                                     "pool `cpu`, and its cpu worker takes only those runs (default: the host name)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", env_nested_delimiter="__", extra="forbid")

    store_root: Path = Path("data/stores")
    storage_url: str = "file://data/objects"
    work_dir: Path = Field(Path("data/work"), description="training outputs, caches")
    cache_dir: Path = Field(Path("data/cache"), description="read-only materialized dataset versions of this worker")
    cache_max_gb: float = Field(50.0, gt=0, description="size cap of cache_dir; least recently used versions go first")
    datasets: DatasetsSettings = Field(default_factory=DatasetsSettings)
    sources: list[SourceSettings] = Field(default_factory=list)
    s3: S3Settings = Field(default_factory=S3Settings)
    transfer: TransferSettings = Field(default_factory=TransferSettings)
    backup: BackupSettings = Field(default_factory=BackupSettings)
    schedules: ScheduleSettings = Field(default_factory=ScheduleSettings)
    scrub: ScrubSettings = Field(default_factory=ScrubSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    training: TrainTriggerSettings = Field(default_factory=TrainTriggerSettings)
    prefect: PrefectSettings = Field(default_factory=PrefectSettings)
    data_files_size_in_mb: int = Field(sizing.DATA_MB, ge=1)
    video_files_size_in_mb: int = Field(sizing.VIDEO_MB, ge=1)
    config_path: Path | None = Field(None, exclude=True)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[SourceSettings]) -> list[SourceSettings]:
        names = [s.name for s in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        return v

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        # environment beats the file (passed as init kwargs); both beat defaults
        return env_settings, init_settings

    def store_path(self, name: str) -> Path:
        """The store of a source or a store name: `<store_root>/<name>`, the name checked (conveyor/stores.py)."""
        from conveyor.stores import check_name

        return self.store_root / check_name(name)

    def source(self, name: str) -> SourceSettings:
        for s in self.sources:
            if s.name == name:
                return s
        raise ConveyorError(self.config_path or "settings", f"no source named {name!r}")

    def masked(self) -> dict[str, Any]:
        """Resolved settings as plain data with every secret replaced by '***', URL credentials included
        (`storage_url = "s3://KEY:SECRET@bucket"` shows as `s3://***@bucket`)."""
        from conveyor.errors import mask_userinfo

        def mask(v):
            if isinstance(v, dict):
                return {k: mask(x) for k, x in v.items()}
            if isinstance(v, list):
                return [mask(x) for x in v]
            return mask_userinfo(v) if isinstance(v, str) else v

        return mask(self.model_dump(mode="json"))  # SecretStr dumps as '**********'


def _resolve(base: Path, s: Settings) -> Settings:
    def r(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    s.store_root = r(s.store_root)
    s.work_dir = r(s.work_dir)
    s.cache_dir = r(s.cache_dir)
    s.prefect.home = r(s.prefect.home)
    for src in s.sources:
        src.path = r(src.path)
    if s.storage_url.startswith("file://") and not s.storage_url.startswith("file:///"):
        s.storage_url = "file://" + str(r(Path(s.storage_url[len("file://"):])))
    return s


def _unknown_key(loc: tuple) -> str:
    """One line for a typo: the key, where it came from (file or CONVEYOR_* variable), and the nearest valid key."""
    import difflib

    model: type[BaseModel] = Settings
    for part in loc[:-1]:  # walk down to the table holding the unknown key; list indices ([[sources]]) skip
        if isinstance(part, int):
            continue
        ann = model.model_fields[part].annotation
        model = next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and
                      issubclass(a, BaseModel)), model)
    valid = [k for k in model.model_fields if k != "config_path"]
    key = ".".join(str(x) for x in loc)
    env = "CONVEYOR_" + "__".join(str(x) for x in loc if not isinstance(x, int)).upper()
    where = f" (from ${env})" if env in os.environ else ""
    near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
    hint = f"did you mean `{'.'.join(str(x) for x in (*loc[:-1], near[0]))}`?" if near else \
        f"valid keys here: {', '.join(valid)}"
    return f"unknown setting `{key}`{where}: {hint}"


def load_settings(config: str | os.PathLike | None = None) -> Settings:
    """`--config` beats `$CONVEYOR_CONFIG` beats `./conveyor.toml`; a missing default file means defaults."""
    explicit = config or os.environ.get(CONFIG_ENV)
    path = Path(explicit) if explicit else DEFAULT_CONFIG
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConveyorError(path, f"not valid TOML: {e}") from None
    elif explicit:
        raise ConveyorError(path, "config file does not exist")
    try:
        s = Settings(**data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConveyorError(path, _unknown_key(err["loc"])) from None
        raise ConveyorError(path, f"invalid setting `{key}`: {err['msg']}") from None
    s.config_path = path.resolve() if path.exists() else None
    return _resolve(path.resolve().parent if path.exists() else Path.cwd(), s)
