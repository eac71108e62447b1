"""Marks torchcodec absent in a lerobot process that decodes with PyAV (PYTHONPATH names this folder).

lerobot evaluates `get_safe_default_video_backend()` as a config default, in lerobot-train and again in each
DataLoader worker, even when `--dataset.video_backend=pyav` overrides it; with torchcodec installed but
unloadable (no matching FFmpeg libraries) every call logs a ~100-line loading traceback. With the module
marked absent, `find_spec` answers None and lerobot picks PyAV quietly. The environment's own
sitecustomize, if any, still runs.
"""
import importlib.machinery
import importlib.util
import os
import sys

if __name__ == "sitecustomize":   # run by `site` at start-up (imported as a module of conveyor: nothing)
    sys.modules.setdefault("torchcodec", None)
    _here = os.path.dirname(os.path.abspath(__file__))
    _next = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
    if _next and _next.loader:
        _next.loader.exec_module(importlib.util.module_from_spec(_next))
