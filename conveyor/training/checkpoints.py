"""lerobot-train checkpoints: which are complete, archiving them, fetching them back, fixing stale paths.

Layout written by lerobot 0.4.4 (`<lerobot_dir>/checkpoints/<step, zero-padded>/{pretrained_model,training_state}`
plus a relative `last` symlink updated *after* a save finishes). Archive layout (keys under the archive URL):

    runs/<run>/checkpoints/<step>/<relative file>   every file of the checkpoint
    runs/<run>/checkpoints/<step>/manifest.json     written last: {file: {size, sha256}}, step, lineage
    runs/<run>/last                                 pointer {"step": ..., "name": ...}, moved after the manifest

A checkpoint counts as archived only when its manifest exists, so an interrupted upload never looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.errors import ConveyorError
from conveyor.fileio import sha256_file
from conveyor.repo import Repo

MANIFEST = "manifest.json"
REQUIRED = ("pretrained_model/config.json", "pretrained_model/model.safetensors",
            "pretrained_model/train_config.json", "training_state/training_step.json",
            "training_state/rng_state.safetensors", "training_state/optimizer_state.safetensors",
            "training_state/optimizer_param_groups.json")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    name: str          # folder name, e.g. "000004"
    path: Path

    @property
    def train_config(self) -> Path:
        return self.path / "pretrained_model" / "train_config.json"


def run_prefix(run: str) -> str:
    return f"runs/{run}/"


def _last_step(ckpt_root: Path) -> int | None:
    last = ckpt_root / "last"
    try:
        return int(os.readlink(last).rstrip("/").split("/")[-1]) if last.is_symlink() else None
    except ValueError:
        return None


def local_checkpoints(lerobot_dir: Path) -> list[Checkpoint]:
    """Every `checkpoints/<digits>/` folder, oldest first (complete or not)."""
    root = lerobot_dir / "checkpoints"
    if not root.is_dir():
        return []
    out = [Checkpoint(int(p.name), p.name, p) for p in root.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted(out, key=lambda c: c.step)


def is_complete(ckpt: Checkpoint, finished: bool = False) -> bool:
    """All files lerobot writes are present, the step file agrees, and lerobot has moved `last` to it or
    past it (it does so only after the save returned) -- or the process already exited cleanly."""
    if not all((ckpt.path / rel).is_file() for rel in REQUIRED):
        return False
    try:
        step = json.loads((ckpt.path / "training_state/training_step.json").read_text())["step"]
        json.loads(ckpt.train_config.read_text())
    except (OSError, ValueError, KeyError):
        return False
    if step != ckpt.step:
        return False
    last = _last_step(ckpt.path.parent)
    return finished or (last is not None and last >= ckpt.step)


def newest_local(lerobot_dir: Path) -> Checkpoint | None:
    done = [c for c in local_checkpoints(lerobot_dir) if is_complete(c)]
    return done[-1] if done else None


def drop_incomplete(lerobot_dir: Path, log: Callable[[str], None] = print) -> list[str]:
    """Remove checkpoint folders a killed run left half-written (they can never be resumed from)."""
    keep = newest_local(lerobot_dir)
    removed = []
    for c in local_checkpoints(lerobot_dir):
        if (keep is None or c.step > keep.step) and not is_complete(c):
            shutil.rmtree(c.path)
            removed.append(c.name)
            log(f"removed incomplete checkpoint {c.path}")
    return removed


# ---------------------------------------------------------------- archive

def _files(ckpt: Checkpoint) -> list[Path]:
    return sorted(p for p in ckpt.path.rglob("*") if p.is_file() and not p.is_symlink())


def archive_checkpoint(objects: Repo, run: str, ckpt: Checkpoint, lineage: dict[str, Any],
                       attempts: int = 3, log: Callable[[str], None] = print) -> dict:
    """Upload one complete checkpoint; manifest last, then the `last` pointer. Retried on error."""
    prefix = f"{run_prefix(run)}checkpoints/{ckpt.name}/"
    for attempt in range(1, attempts + 1):
        try:
            entries, items = {}, []
            for f in _files(ckpt):
                rel = f.relative_to(ckpt.path).as_posix()
                digest = sha256_file(f)                     # the store re-checks it on the way up
                entries[rel] = {"size": f.stat().st_size, "sha256": digest}
                items.append((f, prefix + rel, digest))
            objects.put_files(items)                       # concurrent on S3 (transfer manager)
            manifest = {"run": run, "step": ckpt.step, "name": ckpt.name, "files": entries,
                        "archived_at": time.time(), **lineage}
            objects.put_bytes(prefix + MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            _move_last(objects, run, ckpt)
            return manifest
        except Exception as e:  # noqa: BLE001 -- any storage error: retry, then report
            if attempt == attempts:
                raise ConveyorError(ckpt.path, f"archiving to {prefix} failed after {attempts} tries: {e}") from e
            log(f"archiving {ckpt.name} failed ({e}); retrying")
            time.sleep(min(2 ** attempt, 10))
    raise AssertionError("unreachable")


def _move_last(objects: Repo, run: str, ckpt: Checkpoint) -> None:
    key = run_prefix(run) + "last"
    current = read_last(objects, run)
    if current is None or current["step"] <= ckpt.step:
        objects.put_bytes(key, json.dumps({"step": ckpt.step, "name": ckpt.name}).encode())


def read_last(objects: Repo, run: str) -> dict | None:
    key = run_prefix(run) + "last"
    if not objects.exists(key):
        return None
    try:
        data = json.loads(objects.get_bytes(key))
        return {"step": int(data["step"]), "name": str(data["name"])}
    except (ValueError, KeyError, TypeError):
        return None


def archived(objects: Repo, run: str) -> dict[str, int]:
    """name -> step of every archived checkpoint *with* a manifest (partial uploads are not listed)."""
    out = {}
    for info in objects.list(f"{run_prefix(run)}checkpoints/"):
        parts = info.key[len(run_prefix(run)):].split("/")
        if len(parts) == 3 and parts[2] == MANIFEST and parts[1].isdigit():
            out[parts[1]] = int(parts[1])
    return out


def newest_archived(objects: Repo, run: str) -> tuple[str, int] | None:
    """The `last` pointer when its manifest exists, else the newest step that has one."""
    done = archived(objects, run)
    last = read_last(objects, run)
    if last and last["name"] in done:
        return last["name"], last["step"]
    if not done:
        return None
    name = max(done, key=done.get)
    return name, done[name]


def read_manifest(objects: Repo, run: str, name: str) -> dict:
    return json.loads(objects.get_bytes(f"{run_prefix(run)}checkpoints/{name}/{MANIFEST}"))


def download_checkpoint(objects: Repo, run: str, name: str, lerobot_dir: Path,
                        log: Callable[[str], None] = print) -> Checkpoint:
    """Fetch an archived checkpoint into `<lerobot_dir>/checkpoints/<name>`, every file sha256-checked,
    staged in a hidden folder and renamed in place only when all files verified."""
    manifest = read_manifest(objects, run, name)
    root = lerobot_dir / "checkpoints"
    stage = root / f".{name}.download"
    if stage.exists():
        shutil.rmtree(stage)
    prefix = f"{run_prefix(run)}checkpoints/{name}/"
    for rel, meta in sorted(manifest["files"].items()):
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        objects.get_file(prefix + rel, dst, expected_sha256=meta["sha256"])   # raises CorruptObject on mismatch
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    last = root / "last"
    if last.is_symlink() or last.exists():
        last.unlink()
    last.symlink_to(name)
    log(f"downloaded checkpoint {name} ({len(manifest['files'])} files, sha256 verified) from {prefix}")
    return Checkpoint(int(name), name, final)


# ---------------------------------------------------------------- paths inside a checkpoint

def rewrite_paths(ckpt: Checkpoint, mapping: dict[str, str]) -> list[str]:
    """Replace absolute paths from another machine (or an old location) in the checkpoint's JSON files.

    lerobot stores `output_dir`, `dataset.root`, `vlm_model_name` (and the tokenizer name) as absolute
    paths; resuming elsewhere must point them at this machine's folders. Returns "file: old -> new" lines.
    """
    mapping = {k.rstrip("/"): v.rstrip("/") for k, v in mapping.items() if k and v and k.rstrip("/") != v.rstrip("/")}
    changes: list[str] = []

    def fix(value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {k: fix(v, where) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v, where) for v in value]
        if isinstance(value, str):
            for old, new in mapping.items():
                if value == old or value.startswith(old + "/"):
                    changes.append(f"{where}: {value} -> {new + value[len(old):]}")
                    return new + value[len(old):]
        return value

    for f in sorted((ckpt.path / "pretrained_model").glob("*.json")):
        data = json.loads(f.read_text())
        fixed = fix(data, f.name)
        if fixed != data:
            tmp = f.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(fixed, indent=4))
            os.replace(tmp, f)
    return changes


def saved_paths(ckpt: Checkpoint) -> dict[str, str | None]:
    """The machine-specific paths a checkpoint's train_config.json carries."""
    cfg = json.loads(ckpt.train_config.read_text())
    return {"output_dir": cfg.get("output_dir"), "dataset.root": (cfg.get("dataset") or {}).get("root"),
            "policy.vlm_model_name": (cfg.get("policy") or {}).get("vlm_model_name"),
            "steps": cfg.get("steps")}
