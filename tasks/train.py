"""Prefect tasks around conveyor.training: preflight, the lerobot-train attempt, offline evaluation.

Thin wrappers: the work is in `conveyor.training.*`; here are run logs, progress/table/markdown artifacts.
No task retries: the `train` flow's retries re-run an attempt, which resumes from the newest checkpoint.
"""
from __future__ import annotations

import shlex
import time

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from conveyor.training.attempt import TrainResult, run_attempt
from conveyor.training.preflight import TrainPlan, preflight
from conveyor.training.request import TrainRequest
from conveyor.training.lerobot_train import StepMetrics
from tasks.artifacts import Progress, slug
from tasks.repo import load_storage_settings
from tasks.views import ConfigDump, fresh_start_command, loss_markdown

TERMINAL = {"terminal": True}   # a log record `conveyor train` also prints on the terminal


@task(name="train-preflight", cache_policy=NONE)
def preflight_task(request: TrainRequest, run_name: str, config: str | None = None) -> TrainPlan:
    """Refuse a bad request before any GPU time is spent (one sentence), else the resolved plan."""
    log = get_run_logger()
    plan = preflight(request, load_storage_settings(config), run_name=run_name, log=log.info)
    log.info("run %s: %s on %s %s, %s, %d steps; recipe %s (%s), batch %d, %d data loader workers, video "
             "backend %s, lerobot %s (%s)", plan.run_name, plan.policy_type, plan.repo_id.split("/", 1)[-1],
             plan.dataset_version.short if plan.dataset_version else "(no ledger)", request.device, request.steps,
             plan.recipe, plan.recipe_reason, plan.batch_size, plan.num_workers, plan.video_backend,
             plan.lerobot.version, plan.lerobot.executable, extra=TERMINAL)
    for note in plan.option_notes:
        log.info("option %s", note)
    create_markdown_artifact(
        f"# Training plan `{plan.run_name}`\n\n| | |\n| --- | --- |\n| dataset | `{plan.dataset_root}` |\n"
        f"| dataset version | {plan.dataset_version.short if plan.dataset_version else '-'} |\n"
        f"| policy | {plan.policy_type} |\n| recipe | {plan.recipe} ({plan.recipe_reason}) |\n"
        f"| lerobot | {plan.lerobot.version} (`{plan.lerobot.executable}`) |\n"
        f"| output | `{plan.output_dir}` |\n| archive | `{plan.archive_url or 'off'}` |\n\n"
        f"Fresh-start command:\n\n```bash\n{fresh_start_command(shlex.quote(str(plan.lerobot.executable)), plan.args)}\n```\n",
        key=f"train-plan-{slug(plan.run_name)}", description=f"training plan of {plan.run_name}")
    return plan


@task(name="train-run", cache_policy=NONE)
def run_task(plan: TrainPlan, config: str | None = None) -> TrainResult:
    """One lerobot-train attempt (fresh or resumed); its output goes line by line into this run's log."""
    log = get_run_logger()
    rows: list[StepMetrics] = []
    progress, total = Progress(f"train-progress-{slug(plan.run_name)}", every=2.0), plan.request.steps

    clock: dict = {"t0": None, "s0": 0, "said": -1, "at": 0.0, "loss": None}

    def on_step(step: int) -> None:
        """A line per tenth of the run, every 5 minutes, and at the last step (tagged: the CLI prints it)."""
        now = time.monotonic()
        if clock["t0"] is None:
            clock.update(t0=now, s0=step, at=now)
        tenth = max(1, total // 10)
        due = step // tenth > clock["said"] // tenth or step >= total or now - clock["at"] >= 300
        if step <= max(clock["said"], clock["s0"]) or not due:
            return
        loss = f", loss {clock['loss']:.4g}" if clock["loss"] is not None else ""
        clock.update(said=step, at=now)
        log.info("step %d/%d (%d%%)%s, %.1f s/step", step, total, 100 * step // total, loss,
                 (now - clock["t0"]) / (step - clock["s0"]), extra=TERMINAL)

    def on_metrics(m: StepMetrics) -> None:
        rows.append(m)
        clock["loss"] = m.loss
        progress(m.step, total, f"step {m.step}/{total}, loss {m.loss:.4g}, {m.samples_per_s:.1f} samples/s")

    log.info("lerobot-train's full output: %s/train-*.log", plan.logs_dir, extra=TERMINAL)
    try:
        result = run_attempt(plan, load_storage_settings(config), log=log.info,
                             on_line=ConfigDump(plan.run_name, log.info),
                             on_metrics=on_metrics, on_step=on_step)
    finally:
        if rows:
            every = max(1, len(rows) // 50)
            table = [{"step": m.step, "loss": round(m.loss, 5), "grad norm": round(m.grad_norm, 4),
                      "lr": f"{m.lr:.2e}", "samples/s": round(m.samples_per_s, 2), "update s": m.update_s,
                      "data s": m.data_s} for m in rows[::every] + ([rows[-1]] if (len(rows) - 1) % every else [])]
            create_table_artifact(table, key=f"train-metrics-{slug(plan.run_name)}",
                                  description=f"{plan.run_name}: parsed lerobot-train metrics (this attempt)")
    _summary(plan, result)
    return result


def _summary(plan: TrainPlan, r: TrainResult) -> None:
    state = "already finished" if r.already_finished else f"trained steps {r.started_from}->{r.final_step}"
    where = " (downloaded from the archive)" if r.started_from_archive else ""
    lines = [f"# Run `{r.run_name}`: {state}{where}", "", f"- output: `{r.output_dir}`"]
    picture = loss_markdown(r.loss_plot, f"loss curve of {r.run_name}") if r.loss_plot else ""
    if picture:
        lines.append(f"- loss curve (above): `{r.loss_plot}`")
    if r.log_path:
        lines.append(f"- log: `{r.log_path}`")
    if plan.archive_url:
        lines.append(f"- archive: `{plan.archive_url}/runs/{r.run_name}/` (checkpoints archived by this attempt: "
                     f"{', '.join(r.archived) or 'none'})")
    if r.path_rewrites:
        lines += ["", "Paths rewritten for this machine:", *[f"- `{c}`" for c in r.path_rewrites]]
    create_markdown_artifact("\n".join(lines), key=f"train-run-{slug(r.run_name)}",
                             description=f"{r.run_name} at step {r.final_step}" + (f"\n\n{picture}" if picture else ""))


@task(name="evaluate", cache_policy=NONE)
def evaluate_task(run: str, episodes: list[int] | None = None, config: str | None = None,
                  checkpoint: str | None = None) -> dict:
    """Offline evaluation of a run's checkpoint on held-out episodes; per-joint MAE/MSE as a table."""
    from conveyor.training.evaluate import evaluate

    report = evaluate(run, load_storage_settings(config), episodes=episodes, checkpoint=checkpoint)
    get_run_logger().info("%s", report.summary())
    create_table_artifact(report.table(), key=f"evaluate-{slug(report.run)}",
                          description=f"{report.run} step {report.step}: per-joint error on episodes "
                                      f"{report.episodes} ({report.frames} frames)")
    return report.model_dump(mode="json")
