"""The seed plan's memory recipes as data, and `auto`'s choice between them.

light (<= 12 GB GPU): 384x384 images, chunk_size 10, n_action_steps 10, batch 8, AMP.
standard (>= 24 GB GPU): lerobot's defaults (512x512, chunk_size 50) with batch 16.
cpu (auto on CPU): batch 4, data loaded in the training process: a smoke run that ends in minutes, not
lerobot's GPU-sized defaults (batch 16 and 4 workers ran 10-15 s/step on a 2-core machine).
Data loader workers never exceed the cores this process may run on (os.sched_getaffinity).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from conveyor.training.request import OptionValue, TrainRequest

STANDARD_MIN_GIB = 20.0   # "24 GB card" minus what the driver and other processes typically hold
LIGHT_MIN_GIB = 6.0

_SMOLVLA_LIGHT = {"policy.resize_imgs_with_padding": "[384,384]", "policy.chunk_size": 10,
                  "policy.n_action_steps": 10}
_BATCH = {"light": 8, "standard": 16, "cpu": 4}
_WORKERS = {"light": 4, "standard": 4, "cpu": 0}


@dataclass
class RecipeChoice:
    name: str                      # light | standard | cpu
    reason: str
    batch_size: int
    num_workers: int = 0
    options: dict[str, OptionValue] = field(default_factory=dict)


def cores() -> int:
    """CPU cores this process (and the run it starts) may use: the affinity mask, not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_recipe(req: TrainRequest, policy_type: str, free_gib: float | None) -> RecipeChoice:
    """Resolve `auto` from free GPU memory (`free_gib`, None on CPU) and return the recipe's options."""
    if req.recipe != "auto":
        name, reason = req.recipe, f"recipe {req.recipe} was requested"
    elif free_gib is None:
        name, reason = "cpu", "auto on CPU: a smoke run, batch 4, data loaded in the training process"
    elif free_gib >= STANDARD_MIN_GIB:
        name, reason = "standard", f"auto: {free_gib:.1f} GiB GPU memory free (>= {STANDARD_MIN_GIB:.0f})"
    else:
        name, reason = "light", f"auto: {free_gib:.1f} GiB GPU memory free (< {STANDARD_MIN_GIB:.0f})"
    opts: dict[str, OptionValue] = {}
    if name == "light":
        if policy_type == "smolvla":
            opts.update(_SMOLVLA_LIGHT)
        if req.device == "cuda":
            opts["policy.use_amp"] = True
    workers = _WORKERS[name] if req.num_workers is None else req.num_workers
    if workers > (n := cores()):
        reason += f"; {n} data loader workers, the cores this run has (not {workers})"
        workers = n
    return RecipeChoice(name, reason, req.batch_size or _BATCH[name], workers, opts)


def min_free_gib(recipe: str) -> float:
    return STANDARD_MIN_GIB if recipe == "standard" else LIGHT_MIN_GIB
