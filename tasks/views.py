"""What the Prefect UI shows a lab: the store as a picture, validation verdicts, readable run names, the loss curve.

Pictures are embedded as `data:image/png;base64` in markdown artifacts (Prefect's UI renders `data:image/`
sources), never linked as files: the viewer's browser is often on another machine than the worker.
"""
from __future__ import annotations

import base64
import shlex
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from prefect import get_client
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.actions import ArtifactCreate
from prefect.runtime import flow_run

from conveyor.reports import IngestReport, ValidationReport, md_text
from conveyor.training.lerobot_log import ConfigDump as LerobotConfigDump
from tasks.artifacts import slug


def png_markdown(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"




def fresh_start_command(program: str, args: list[str]) -> str:
    """A command that pastes into a shell: every line but the last ends in ` \\`, each argument quoted."""
    return " \\\n".join([program] + [f"    {shlex.quote(a)}" for a in args])


# -- ingest ------------------------------------------------------------------------------------------

def ingest_done_text(report: IngestReport) -> str:
    """The progress artifact's last words."""
    if report.added:
        return (f"done: {len(report.added)} episode(s) committed (commit {report.version.commit}, "
                f"{report.version.total_episodes} episodes in the store)")
    return f"done: nothing new (store at commit {report.version.commit})"


def ingest_run_name(name: str, report: IngestReport) -> str:
    """`koch_grasp +3 ep -> c12`: the runs list reads as the store's history."""
    v = report.version
    text = f"{name} +{len(report.added)} ep -> c{v.commit}" if report.added else f"{name} nothing new (c{v.commit})"
    if report.quarantined:
        text += f", {len(report.quarantined)} quarantined"
    return text


def rename_this_run(name: str) -> None:
    """Rename the current flow run (no-op outside one); a display nicety must never fail a run."""
    run_id = flow_run.get_id()
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=name)
    except Exception:  # noqa: BLE001
        pass


def store_overview(name: str, store_path: Path) -> str:
    """The store-wide artifact (key `store-<name>`, a new version per commit): totals, a picture, tables."""
    from conveyor.charts import store_png
    from conveyor.inventory import describe

    d = describe(Path(store_path), name)
    picture = png_markdown(store_png(d), f"{name}: episodes over commits and episode lengths")
    when = f", last commit {d.last_commit:%Y-%m-%d %H:%M:%S %Z}" if d.last_commit else ""
    lines = [f"# Store `{name}`: {d.episodes} episodes, {d.frames} frames, {d.hours * 60:.1f} min", "",
             f"Version {d.version}{when}; {d.size_bytes / 1e6:.1f} MB at `{d.path}`.", ""]
    if d.cameras:
        lines += ["| camera | resolution | codec | fps |", "| --- | --- | --- | --- |"]
        lines += [f"| {c.key} | {c.width}x{c.height} | {c.codec or '-'} {c.pix_fmt or ''} | {c.fps:g} |"
                  if c.fps else f"| {c.key} | {c.width}x{c.height} | {c.codec or '-'} | - |" for c in d.cameras]
        lines.append("")
    if d.tasks:
        lines += ["| task | episodes |", "| --- | --- |"]
        lines += [f"| {md_text(t.task) or '(none)'} | {t.episodes} |" for t in d.tasks[:20]]
        lines.append("")
    if d.lengths.frames and d.fps:
        L, fps = d.lengths, d.fps
        lines += [f"Episode length: min {L.min / fps:.1f} s, median {L.median / fps:.1f} s, "
                  f"max {L.max / fps:.1f} s.", ""]
    if d.quarantined:
        lines += [f"**{len(d.quarantined)} quarantined episode(s):**", "",
                  "| source episode | reason |", "| --- | --- |"]
        lines += [f"| {q.source_episode_index} | {md_text(q.reason)} |" for q in d.quarantined]
    # the picture goes in the description: the run page's artifact cards show the description only, and the
    # artifact page shows it above the body (kept once: every commit stores a new version)
    create_markdown_artifact("\n".join(lines), key=f"store-{slug(name)}",
                             description=f"{name}: {d.episodes} episodes, {d.hours * 60:.1f} min, {d.version}"
                                         f"\n\n{picture}")
    return f"store-{slug(name)}"


def validation_summary(name: str, commit: int, fast: ValidationReport | None, deep: ValidationReport | None,
                       deep_note: str = "", flow_run_id: str | UUID | None = None) -> None:
    """Pass/fail of fast and deep validation of one commit (key `validation-<name>`).

    `flow_run_id` attaches it to another run: the watch flow's deep check reports on the ingest run it
    belongs to.
    """
    rows = []
    for kind, r in (("fast", fast), ("deep", deep)):
        if r is None:
            continue
        rows.append((kind, r, r.frames_compared, r.pixel_identical))
    ok = all(r.ok for _, r, _, _ in rows)
    lines = [f"# Validation of `{name}` commit {commit}: {'PASSED' if ok else 'FAILED'}", "",
             "| check | verdict | checks | episodes | frames compared | pixel-identical samples | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind, r, frames, pixel in rows:
        verdict = "pass" if r.ok else f"**FAIL** ({len(r.failures)})"
        lines.append(f"| {kind} | {verdict} | {len(r.checks)} | {len(r.episodes_checked)} | {frames} | {pixel} "
                     f"| {r.seconds:.2f} |")
    if deep_note:
        lines += ["", deep_note]
    for _, r, _, _ in rows:
        for c in r.failures:
            lines.append(f"- FAIL {md_text(c.name)}: {md_text(c.detail)}")
    desc = f"{name} c{commit}: " + ", ".join(f"{k} {'pass' if r.ok else 'FAIL'}" for k, r, _, _ in rows)
    _markdown(f"validation-{slug(name)}", desc, "\n".join(lines), flow_run_id)


def validation_failed(name: str, commit: int, error: BaseException, flow_run_id: str | UUID | None = None) -> None:
    """The verdict when a validation task raised (its report is in the error message)."""
    _markdown(f"validation-{slug(name)}", f"{name} c{commit}: FAIL",
              f"# Validation of `{name}` commit {commit}: FAILED\n\n{md_text(str(error))}\n", flow_run_id)


def report_deep_check(name: str, future, ingest_runs: list[tuple[str, int]], log) -> None:
    """Put a finished deep check's verdict on each ingest run whose episodes it covered, under the commit
    that run made (the check reads the store as it is by then, often a later commit)."""
    try:
        if future.state.is_completed():
            r = future.result()
            seen = f" (the store was at c{r.version.commit} when checked)" if r.version else ""
            for run, commit in ingest_runs:
                validation_summary(name, commit, None, r,
                                   f"Deep check run by the watch flow for the episodes of this run{seen}.", run)
        else:
            for run, commit in ingest_runs:
                validation_failed(name, commit, RuntimeError(future.state.message or "deep check failed"), run)
    except Exception as e:  # noqa: BLE001 - a display must never stop the watcher
        log.warning("%s: deep check verdict not attached to the ingest run: %s", name, e)


def _markdown(key: str, description: str, text: str, flow_run_id: str | UUID | None) -> None:
    if flow_run_id is None:
        create_markdown_artifact(text, key=key, description=description)
        return
    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(key=key, type="markdown", description=description, data=text,
                                              flow_run_id=UUID(str(flow_run_id))))


# -- training ----------------------------------------------------------------------------------------

def loss_markdown(png_path: str | Path, title: str) -> str:
    """The loss curve embedded in markdown (bytes, not a link: the worker may be another machine)."""
    p = Path(png_path)
    return png_markdown(p.read_bytes(), title) if p.is_file() else ""


class ConfigDump(LerobotConfigDump):
    """lerobot-train's output lines, passed on, except its config dump, which becomes one table artifact
    (`train-config-<run>`) of `option = value` rows (the parsing: conveyor/training/lerobot_log.py)."""

    def __init__(self, run_name: str, on_line: Callable[[str], None]):
        super().__init__(on_line, self._publish)
        self.run_name = run_name

    def _publish(self, rows: list[dict]) -> str:
        create_table_artifact(rows, key=f"train-config-{slug(self.run_name)}",
                              description=f"{self.run_name}: lerobot-train configuration ({len(rows)} options)")
        return f"lerobot-train configuration ({len(rows)} options): see the train-config artifact"
