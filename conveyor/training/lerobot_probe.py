"""What preflight asks the lab's lerobot environment: its versions, its safe video backend, and whether the
run's arguments parse and validate as its `TrainPipelineConfig`.

Standalone on purpose (standard library + lerobot only): when the lab's `lerobot-train` lives in another
interpreter (a fork, another Python), preflight runs this file there (`python lerobot_probe.py < args.json`)
and reads one JSON object from stdout; when it is conveyor's own environment, preflight imports it.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from importlib import metadata


def versions() -> dict[str, str]:
    out = {"python": ".".join(map(str, sys.version_info[:3]))}
    for pkg in ("lerobot", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def safe_video_backend() -> str:
    """torchcodec only when it really loads (0.4.4 picks it whenever it is importable, even without FFmpeg's
    shared libraries; 0.6 logs a ~100-line traceback before falling back). When it does not load it is
    marked absent here, as pyav_hook does in the run's processes, so lerobot's config defaults pick PyAV
    without trying it again."""
    if sys.modules.get("torchcodec", False) is None:
        return "pyav"
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
        return "torchcodec"
    except Exception:  # noqa: BLE001 -- ImportError, OSError or RuntimeError("Could not load libtorchcodec")
        sys.modules["torchcodec"] = None
        return "pyav"


def torch_hub_checkpoints() -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")


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
    backend_note = logging.getLogger("lerobot.utils.import_utils")  # the video backend default's warning
    backend_note.disabled = True
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            return parser.wrap()(_parse)()
    except SystemExit:
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        raise ValueError(lines[-1] if lines else "invalid arguments") from None
    finally:
        sys.argv = saved
        backend_note.disabled = False


def check(args: list[str]) -> dict:
    """The probe's answer: versions, safe video backend, torch hub folder, and the parse outcome."""
    out: dict = {"versions": versions(), "video_backend": safe_video_backend(),
                 "torch_hub_checkpoints": torch_hub_checkpoints(), "error": None, "policy": None}
    try:
        cfg = parse_train_config(args)
    except Exception as e:  # noqa: BLE001 -- any parse/validate error is a refusal, in lerobot's words
        text = str(e).strip()
        out["error"] = text.splitlines()[0] if text else type(e).__name__
        return out
    weights = getattr(cfg.policy, "pretrained_backbone_weights", None)
    out["policy"] = {"type": cfg.policy.type, "pretrained_backbone_weights": None if weights is None else str(weights),
                     "pretrained_path": None if cfg.policy.pretrained_path is None else str(cfg.policy.pretrained_path)}
    return out


if __name__ == "__main__":
    request = json.load(sys.stdin)
    answer = check(request["args"])
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
