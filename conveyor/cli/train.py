"""`conveyor train` and `conveyor evaluate`: the same flow code the UI runs.

With a Prefect server configured (PREFECT_API_URL or settings.prefect.api_url) the flow run is recorded
there (logs, artifacts, retries); otherwise the flow runs in-process against Prefect's own ephemeral API
with PREFECT_HOME = settings.prefect.home.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime


from conveyor.errors import ConveyorError


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `evaluate` to the `conveyor` parser."""
    p = sub.add_parser("train", help="train a policy on a store with lerobot-train (resumable, archived)",
                       description="Train a policy on a store with lerobot-train, through the same flow the "
                                   "Prefect UI runs. With a Prefect server running (`conveyor up`, or "
                                   "PREFECT_API_URL) the run shows in its UI and its link is printed.")
    p.add_argument("--store", required=True, metavar="STORE",
                   help="store name (folder under store_root) or a LeRobot v3.0 dataset folder")
    p.add_argument("--policy-type", choices=["smolvla", "act", "diffusion", "pi0"], default="smolvla",
                   help="policy to train from scratch")
    p.add_argument("--policy-path", metavar="DIR", help="local pretrained policy folder to fine-tune instead")
    p.add_argument("--vlm-model-name", metavar="DIR",
                   help="SmolVLA: local SmolVLM folder (default: the one in --policy-path's config)")
    p.add_argument("--steps", type=int, default=20_000, help="training ends at exactly this step")
    p.add_argument("--batch-size", type=int, help="per-GPU batch size (default: the recipe's)")
    p.add_argument("--save-freq", type=int, default=5_000, help="save and archive a checkpoint every N steps")
    p.add_argument("--log-freq", type=int, default=100, help="log loss, grad norm and lr every N steps")
    p.add_argument("--num-workers", type=int, default=4, help="data loader worker processes")
    p.add_argument("--seed", type=int, default=1000, help="random seed")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu only for smoke tests")
    p.add_argument("--gpus", type=int, default=1, help="GPUs; more than 1 runs `accelerate launch`")
    p.add_argument("--recipe", choices=["auto", "light", "standard"], default="auto",
                   help="memory recipe: light for <= 12 GB GPUs, standard for >= 24 GB, auto picks by free memory")
    p.add_argument("--dataset-version", metavar="VERSION",
                   help="pin a dataset version: commit number or content-hash prefix (default: current)")
    p.add_argument("--run-name", help="reuse a name to continue that run (default: <policy>-<store>-<time>, policy 'finetune' with --policy-path)")
    p.add_argument("--output-dir", metavar="DIR", help="run folder (default: <work_dir>/runs/<run name>)")
    p.add_argument("--archive", metavar="URL", help="object storage for checkpoints (default: settings.storage_url)")
    p.add_argument("--no-archive", action="store_true", help="keep checkpoints local only")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="OPTION=VALUE",
                   help="extra lerobot-train option, e.g. --set policy.optimizer_lr=5e-5 (repeatable)")
    p.set_defaults(handler=cmd_train)

    e = sub.add_parser("evaluate", help="per-joint MAE/MSE of a run's checkpoint on held-out episodes")
    e.add_argument("run", metavar="RUN", help="run name (under <work_dir>/runs), run folder or checkpoint folder")
    e.add_argument("--episodes", help="comma-separated store episodes (default: those added after the run's version)")
    e.add_argument("--checkpoint", help="checkpoint step (default: newest complete)")
    e.set_defaults(handler=cmd_evaluate)


def _prefect_env(args) -> str | None:
    """Point Prefect at a server: PREFECT_API_URL, settings.prefect.api_url, or a local `conveyor up` that
    answers on settings.prefect.host:port; else Prefect's own temporary API with PREFECT_HOME =
    settings.prefect.home. Returns the UI address when the run will show in a UI."""
    from conveyor.settings import load_settings

    settings = load_settings(args.config)
    api = os.environ.get("PREFECT_API_URL") or settings.prefect.api_url
    if not api:
        local = f"http://{settings.prefect.host}:{settings.prefect.port}/api"
        api = local if _answers(local) else None
    if api:
        os.environ["PREFECT_API_URL"] = api
    else:
        os.environ.setdefault("PREFECT_HOME", str(settings.prefect.home))
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a busy machine
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    _quiet_prefect_console()
    return api.rstrip("/").removesuffix("/api") if api else None


def _answers(api: str) -> bool:
    import httpx

    try:
        return httpx.get(api + "/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


_NOISE = ("Starting temporary server", "Stopping temporary server", "Running hook", "Hook ",
          "Finished in state Failed", "Finished in state Crashed")
_RESTATED = ("Task run failed with exception", "Encountered exception")


class _NoTraceback:
    """Console-only log filter: no temporary-server notice, no traceback (the error gets one line; the
    run's full log, traceback included, stays in the Prefect UI and the run's log file)."""

    def filter(self, record):
        import copy
        import logging

        msg = str(record.msg)
        if msg.startswith(_NOISE) or (record.levelno >= logging.ERROR and msg.startswith(_RESTATED)):
            return False
        if record.exc_info or (record.levelno >= logging.ERROR and "Traceback (most recent call last)" in msg):
            if "Encountered exception during execution" in msg or "Traceback" in msg:
                return False
            record = copy.copy(record)
            record.exc_info = record.exc_text = None
            return record
        return True


def _quiet_prefect_console() -> None:
    import logging

    from prefect.logging import configuration
    from prefect.logging.handlers import PrefectConsoleHandler

    if not configuration.PROCESS_LOGGING_CONFIG:
        configuration.setup_logging()
    for name in ("prefect", "prefect.server.api.server", ""):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, PrefectConsoleHandler) and not any(isinstance(f, _NoTraceback) for f in h.filters):
                h.addFilter(_NoTraceback())


def _run_flow(flow, ui: str | None, **params):
    """Run `flow` in this process; print its UI link when it starts; a failure raises the flow's own error."""
    def announce(_flow, run, _state):
        if ui:
            print(f"run {run.name}: {ui}/v2/runs/flow-run/{run.id}?tab=Artifacts", flush=True)

    state = flow.with_options(on_running=[announce])(**params, return_state=True)
    if state.is_completed():
        return state.result()
    try:
        state.result(raise_on_failure=True)
    except ConveyorError:
        raise
    except Exception as e:  # noqa: BLE001 - one line for the user; the traceback is in the run's log
        raise ConveyorError("train", f"{type(e).__name__}: {e}".splitlines()[0]) from None
    raise ConveyorError("train", state.message or f"run ended {state.name}")


def build_request(args):
    from conveyor.training.request import TrainRequest, default_run_name, parse_set_options

    try:
        options = parse_set_options(args.options)
    except ValueError as ex:
        raise ConveyorError("--set", str(ex)) from None
    fields = dict(store=args.store, policy_type=args.policy_type, policy_path=args.policy_path,
                  vlm_model_name=args.vlm_model_name, steps=args.steps, batch_size=args.batch_size,
                  save_freq=args.save_freq, log_freq=args.log_freq, num_workers=args.num_workers, seed=args.seed,
                  device=args.device, gpus=args.gpus, recipe=args.recipe, dataset_version=args.dataset_version,
                  run_name=args.run_name, output_dir=args.output_dir, archive=not args.no_archive,
                  archive_url=args.archive, options=options)
    from pydantic import ValidationError  # here: every other command is spared pydantic's import

    try:
        request = TrainRequest(**fields)
        if not request.run_name:
            stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
            request = TrainRequest(**fields | {"run_name": default_run_name(request, stamp)})
    except ValidationError as ex:
        err = ex.errors()[0]
        raise ConveyorError("--" + "-".join(str(x) for x in err["loc"]).replace("_", "-"), err["msg"]) from None
    return request


def cmd_train(args) -> int:
    request = build_request(args)
    ui = _prefect_env(args)
    from flows.train import train

    result = _run_flow(train, ui, request=request, config=args.config)
    if result["already_finished"]:
        print(f"run {result['run_name']} already finished at step {result['final_step']}; nothing to do")
    else:
        src = (f"resumed from step {result['started_from']}" + (" (archive)" if result["started_from_archive"] else "")
               if result["started_from"] else "fresh")
        print(f"run {result['run_name']} finished at step {result['final_step']} ({src}); "
              f"output {result['output_dir']}" + (f", loss plot {result['loss_plot']}" if result["loss_plot"] else ""))
    return 0


def cmd_evaluate(args) -> int:
    episodes = None
    if args.episodes:
        try:
            episodes = [int(x) for x in args.episodes.split(",") if x.strip()]
        except ValueError:
            raise ConveyorError("--episodes", "must be comma-separated integers, e.g. 3,4") from None
    ui = _prefect_env(args)
    from flows.train import evaluate

    report = _run_flow(evaluate, ui, run=args.run, episodes=episodes, checkpoint=args.checkpoint,
                       config=args.config)
    print(f"{report['run']} step {report['step']} ({report['policy_type']}), episodes {report['episodes']}"
          f"{'' if report['held_out'] else ' (seen in training)'}, {report['frames']} frames")
    width = max(len(j["joint"]) for j in report["joints"]) + 2
    print(f"{'joint':<{width}}{'MAE':>10}{'MSE':>12}")
    for j in report["joints"]:
        print(f"{j['joint']:<{width}}{j['mae']:>10.5f}{j['mse']:>12.6f}")
    print(f"{'all':<{width}}{report['mae']:>10.5f}{report['mse']:>12.6f}")
    sys.stdout.flush()
    return 0
