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

from pydantic import ValidationError

from conveyor.errors import ConveyorError


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `evaluate` to the `conveyor` parser."""
    p = sub.add_parser("train", help="train a policy on a store with lerobot-train (resumable, archived)")
    p.add_argument("--store", required=True, help="store name from settings, or a v3.0 dataset folder")
    p.add_argument("--policy-type", choices=["smolvla", "act", "diffusion", "pi0"], default="smolvla")
    p.add_argument("--policy-path", help="local pretrained policy folder to fine-tune")
    p.add_argument("--vlm-model-name", help="SmolVLA: local SmolVLM folder")
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--save-freq", type=int, default=5_000)
    p.add_argument("--log-freq", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--recipe", choices=["auto", "light", "standard"], default="auto")
    p.add_argument("--dataset-version", help="pin: commit number or content-hash prefix")
    p.add_argument("--run-name", help="reuse a name to continue that run (default: <policy>-<store>-<time>, "
                                     "policy 'finetune' with --policy-path)")
    p.add_argument("--output-dir", help="run folder (default: <work_dir>/runs/<run name>)")
    p.add_argument("--archive", metavar="URL", help="object storage for checkpoints (default: settings.storage_url)")
    p.add_argument("--no-archive", action="store_true", help="keep checkpoints local only")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="OPTION=VALUE",
                   help="extra lerobot-train option, e.g. --set policy.optimizer_lr=5e-5 (repeatable)")
    p.set_defaults(handler=cmd_train)

    e = sub.add_parser("evaluate", help="per-joint MAE/MSE of a run's checkpoint on held-out episodes")
    e.add_argument("run", help="run name (under <work_dir>/runs), run folder or checkpoint folder")
    e.add_argument("--episodes", help="comma-separated store episodes (default: added after the run's version)")
    e.add_argument("--checkpoint", help="checkpoint step (default: newest complete)")
    e.set_defaults(handler=cmd_evaluate)


def _prefect_env(args) -> None:
    """Point Prefect at the configured server, or at a project-local home for the in-process API."""
    from conveyor.settings import load_settings

    settings = load_settings(args.config)
    api = os.environ.get("PREFECT_API_URL") or settings.prefect.api_url
    if api:
        os.environ["PREFECT_API_URL"] = api
    else:
        os.environ.setdefault("PREFECT_HOME", str(settings.prefect.home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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
    _prefect_env(args)
    from flows.train import train

    result = train(request=request, config=args.config)
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
    _prefect_env(args)
    from flows.train import evaluate

    report = evaluate(run=args.run, episodes=episodes, checkpoint=args.checkpoint, config=args.config)
    print(f"{report['run']} step {report['step']} ({report['policy_type']}), episodes {report['episodes']}"
          f"{'' if report['held_out'] else ' (seen in training)'}, {report['frames']} frames")
    width = max(len(j["joint"]) for j in report["joints"]) + 2
    print(f"{'joint':<{width}}{'MAE':>10}{'MSE':>12}")
    for j in report["joints"]:
        print(f"{j['joint']:<{width}}{j['mae']:>10.5f}{j['mse']:>12.6f}")
    print(f"{'all':<{width}}{report['mae']:>10.5f}{report['mse']:>12.6f}")
    sys.stdout.flush()
    return 0
