"""`conveyor train` and `conveyor evaluate`: the same flow code the UI runs.

With a Prefect server configured (PREFECT_API_URL or settings.prefect.api_url) the flow run is recorded
there (logs, artifacts, retries); otherwise the flow runs in-process against Prefect's own ephemeral API
with PREFECT_HOME = settings.prefect.home.
"""
from __future__ import annotations

import argparse
import logging
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
    p.add_argument("--num-workers", type=int,
                   help="data loader worker processes (default: the recipe's, 4 on a GPU and 0 on CPU; at most "
                        "the cores the run has)")
    p.add_argument("--seed", type=int, default=1000, help="random seed")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu only for smoke tests")
    p.add_argument("--gpus", type=int, default=1, help="GPUs; more than 1 runs `accelerate launch`")
    p.add_argument("--recipe", choices=["auto", "light", "standard"], default="auto",
                   help="memory recipe: light for <= 12 GB GPUs, standard for >= 24 GB, auto picks by free memory "
                        "(on CPU: batch 4, no data loader workers, for a smoke run)")
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


class _Console:
    """Filter for Prefect's console handlers: nothing of a run's log reaches the terminal (lerobot's output
    and Prefect's own lines stay in the UI and the run's log file); the CLI prints its own lines."""

    def filter(self, record) -> bool:
        return False


_LINK: list[str] = []   # the run's UI link, printed before the run's first terminal line (after preflight)


class _Terminal:
    """What a person at the terminal needs, from the run's log: records tagged `terminal` (the plan, the
    progress lines, where lerobot's log is) as bare lines, the UI link before the first, and a retry notice.
    A run refused by preflight prints only its one-line error."""

    def filter(self, record) -> bool:
        if getattr(record, "terminal", False):
            if _LINK:
                record.msg, record.args = f"{_LINK.pop()}\n{record.getMessage()}", ()
            return True
        if str(record.msg).startswith("Received non-final state 'AwaitingRetry'"):
            record.msg, record.args = "the attempt failed; retrying (it resumes from the newest checkpoint)", ()
            return True
        return False


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (a test's capture, a redirected stream)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def _quiet_prefect_console() -> None:
    from prefect.logging import configuration
    from prefect.logging.handlers import PrefectConsoleHandler

    if not configuration.PROCESS_LOGGING_CONFIG:
        configuration.setup_logging()
    for name in ("prefect", "prefect.server.api.server", ""):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, PrefectConsoleHandler) and not any(isinstance(f, _Console) for f in h.filters):
                h.addFilter(_Console())
    prefect_logger = logging.getLogger("prefect")
    if not any(isinstance(f, _Terminal) for h in prefect_logger.handlers for f in h.filters):
        terminal = _Stdout()
        terminal.setFormatter(logging.Formatter("%(message)s"))
        terminal.addFilter(_Terminal())
        prefect_logger.addHandler(terminal)


CLI_TAG = "conveyor-cli"     # a run started by `conveyor train`/`evaluate`, with `cli-pid:<pid>@<host>` beside it


def _owner_tag() -> str:
    import socket

    return f"cli-pid:{os.getpid()}@{socket.gethostname()}"


def _alive(pid: int, since: float) -> bool:
    """The process with this pid that started the run (started before `since`, the run's creation time)
    still runs here; a pid reused by a later process does not count."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])       # field 22: start time after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return boot + ticks / os.sysconf("SC_CLK_TCK") <= since + 2


def _crash_orphans() -> None:
    """A CLI run whose process ended without telling the server (kill -9, a reboot, the server down while
    it ended) would stay Running: at the next `conveyor train`/`evaluate` on the same machine, mark each
    such run of this machine Crashed."""
    import socket

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, \
        FlowRunFilterTags
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    host = socket.gethostname()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[CLI_TAG]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
        for run in runs:
            owner = next((t.removeprefix("cli-pid:") for t in run.tags if t.startswith("cli-pid:")), "")
            pid, _, where = owner.partition("@")
            if where == host and pid.isdigit() and not _alive(int(pid), run.created.timestamp()):
                client.set_flow_run_state(run.id, Crashed(message=f"its `conveyor` process (pid {pid} on {host}) "
                                                                  "ended without reporting"), force=True)


class _sigterm_as_interrupt:
    """SIGTERM ends a CLI run the way Ctrl-C does (Prefect marks the run Crashed, lerobot-train is stopped),
    instead of killing the process with the run left Running."""

    def __enter__(self):
        import signal

        def interrupt(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        self.saved = signal.signal(signal.SIGTERM, interrupt)
        return self

    def __exit__(self, *exc):
        import signal

        signal.signal(signal.SIGTERM, self.saved)


def _run_flow(flow, ui: str | None, **params):
    """Run `flow` in this process; print its UI link when it starts; a failure raises the flow's own error."""
    def announce(_flow, run, _state):
        if ui:
            _LINK[:] = [f"in the UI: {ui}/runs/flow-run/{run.id}"]

    import prefect

    if ui:
        _crash_orphans()
    with prefect.tags(CLI_TAG, _owner_tag()), _sigterm_as_interrupt():
        state = flow.with_options(on_running=[announce])(**params, return_state=True)
    if state.is_completed():
        if _LINK:
            print(_LINK.pop())
        return state.result()
    try:
        state.result(raise_on_failure=True)
    except ConveyorError:
        raise
    except Exception as e:  # noqa: BLE001 - one line for the user; the traceback is in the run's log
        raise ConveyorError("train", f"{type(e).__name__}: {e}".splitlines()[0]) from None
    raise ConveyorError("train", state.message or f"run ended {state.name}")


class _UsageError(Exception):
    """A malformed command line (exit 2, one line)."""


def build_request(args):
    from conveyor.training.request import TrainRequest, default_run_name, parse_set_options

    try:
        options = parse_set_options(args.options)
    except ValueError as ex:
        raise _UsageError(str(ex)) from None
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
    try:
        request = build_request(args)
    except _UsageError as e:
        print(f"conveyor train: error: {e}", file=sys.stderr)
        return 2
    ui = _prefect_env(args)
    from flows.train import train

    result = _run_flow(train, ui, request=request, config=args.config or "")
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
