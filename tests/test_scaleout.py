"""Scale-out on one machine: a Prefect server on PostgreSQL, S3 (moto), and "machines" that are folders.

Each machine has its own folder, conveyor.toml, HOME and cache, and joins the shared server the way a lab's
machines do: the recording PC runs `conveyor up --api-url URL --pools cpu` (watcher, cpu worker, deployments
and the rescue automation on the shared server), each GPU box runs `conveyor worker --pool gpu --api-url URL`.
A machine "dies" by SIGKILL of every process that carries its HOME.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conveyor.compact import compact
from conveyor.processes import marked_pids
from conveyor.store import Store
from conveyor.training import checkpoints as ck
from conveyor.service.supervisor import api
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter

SPEC = RecordingSpec(fps=10, cameras=(CameraSpec("observation.images.cam", height=32, width=32, codec="h264"),))
LEN = 12
STEPS, SAVE_FREQ = 8, 4
BUCKET = "lab"

pytestmark = pytest.mark.slow


def wait_for(cond, timeout: float, what: str, interval: float = 0.5, why=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{why()}")


class Machine:
    """A folder standing for one computer: its settings, HOME and processes."""

    def __init__(self, root: Path, s3_endpoint: str, *, extra: str = ""):
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True)
        self.config = root / "conveyor.toml"
        self.config.write_text(f"""
store_root = "stores"
work_dir = "work"
cache_dir = "cache"
storage_url = "s3://{BUCKET}/conveyor"
[s3]
endpoint_url = "{s3_endpoint}"
addressing_style = "path"
[prefect]
home = "prefect"
worker_query_seconds = 1
{extra}
""", encoding="utf-8")
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CONVEYOR_"))}
        env["HOME"] = str(self.home)
        return env

    def conveyor(self, *args: str) -> subprocess.Popen:
        log = self.root / f"{args[0]}-{len(self.procs)}.out"
        with open(log, "wb") as out:
            p = subprocess.Popen([sys.executable, "-m", "conveyor.cli", "--config", str(self.config), *args],
                                 cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.procs.append(p)
        self.logs.append(log)
        return p

    def output(self, tail: int | None = None) -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-(tail or 0):]}" for p in self.logs)

    def pids(self) -> list[int]:
        return marked_pids(str(self.home), "HOME")

    def crash(self) -> None:
        """The machine loses power: every process of it, SIGKILL, no cleanup (again until none is left: a
        process may fork while the list is read)."""
        deadline = time.monotonic() + 20
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for p in self.procs:
            p.wait(10)

    def stop(self) -> list[int]:
        """Ctrl-C on every command of this machine; the exit codes."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        return [p.wait(90) for p in self.procs]


def recording_pc(source: str) -> str:
    """A recording PC's source (folder `rec` of its machine) and a watcher quick enough for a test."""
    return f"""
[[sources]]
name = "{source}"
path = "rec"
task = "pick the cube"
[watch]
settle_seconds = 0.3
debounce_seconds = 0.1
rescan_seconds = 5
"""


def train_runs(api_url: str) -> list[dict]:
    status, runs = api(api_url, "POST", "/flow_runs/filter", {"flows": {"name": {"any_": ["train"]}}})
    assert status == 200, runs
    return runs


def s3_json(s3, key: str) -> dict | None:
    try:
        return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


@pytest.mark.lerobot
def test_gpu_machine_dies_mid_run_and_another_resumes_it(postgres_prefect_server, s3_endpoint, tmp_path):
    """Recording PC + two GPU boxes on a Prefect server backed by PostgreSQL: a growing recording is ingested,
    training is triggered, GPU box 1 trains and archives a checkpoint, then dies; the server's rescue
    automation reschedules the run, GPU box 2 takes it, resumes from the archived checkpoint and ends at the
    requested step, with the dataset version the run was pinned to."""
    import boto3

    api_url = postgres_prefect_server.api_url
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    name = "lab-grasp"
    pc = Machine(tmp_path / "recording-pc", s3_endpoint, extra=recording_pc(name) + f"""
[training]
policy = "every_n"
every_n = 3
[training.parameters.request]
store = "{{store}}"
dataset_version = "{{content_hash}}"
policy_type = "act"
device = "cpu"
steps = {STEPS}
save_freq = {SAVE_FREQ}
batch_size = 2
num_workers = 0
log_freq = 1
[training.parameters.request.options]
"policy.pretrained_backbone_weights" = "null"
"policy.dim_model" = 32
"policy.dim_feedforward" = 64
"policy.n_heads" = 2
"policy.n_encoder_layers" = 1
"policy.n_decoder_layers" = 1
"policy.n_vae_encoder_layers" = 1
"policy.chunk_size" = 5
"policy.n_action_steps" = 5
""")
    # the GPU boxes: their own store_root (empty), so they cannot reach the store; only S3 connects them
    gpu1 = Machine(tmp_path / "gpu-box-1", s3_endpoint)
    gpu2 = Machine(tmp_path / "gpu-box-2", s3_endpoint)
    machines = (pc, gpu1, gpu2)

    def why() -> str:
        return "\n".join(m.output(tail=4000) for m in machines)

    rec = RecordingWriter(pc.root / "rec", SPEC)
    store = pc.root / "stores" / name
    try:
        up = pc.conveyor("up", "--api-url", api_url, "--pools", "cpu")
        gpu1.conveyor("worker", "--pool", "gpu", "--api-url", api_url)
        wait_for(lambda: "conveyor is up" in pc.output() or up.poll() is not None, 240, "conveyor up", why=why)
        assert up.poll() is None, why()
        wait_for(lambda: "serving pool gpu" in gpu1.output(), 60, "gpu worker 1", why=why)
        out1 = " ".join(gpu1.output().split())
        assert f"Prefect API: {api_url}" in out1 and f"storage: s3://{BUCKET}/conveyor" in out1
        assert f"config: {gpu1.config}" in out1 and f"work_dir: {gpu1.root / 'work'}" in out1

        # the recording grows: three episodes cross every_n = 3, ingest triggers training on that version
        for ep in range(3):
            rec.write_episode(ep, LEN)
        wait_for(lambda: train_runs(api_url), 120, "the triggered train run", why=why)
        v1 = Store.open(store).version
        assert v1.total_episodes == 3
        [run] = train_runs(api_url)
        assert run["parameters"]["request"]["dataset_version"] == v1.content_hash
        run_name = f"act-{name}-{run['id'][:8]}"
        out_dir = gpu1.root / "work" / "runs" / run_name
        manifest = f"conveyor/runs/{run_name}/checkpoints/{SAVE_FREQ:06d}/manifest.json"

        # meanwhile the recording grows (3 -> 5 episodes: no new trigger) and the store is compacted
        for ep in range(3, 5):
            rec.write_episode(ep, LEN)
        wait_for(lambda: Store.open(store).version.total_episodes == 5, 120, "episodes 3 and 4", why=why)
        compacted = compact(store)
        assert compacted.files_after < compacted.files_before
        v2 = Store.open(store).version
        assert v2.content_hash != v1.content_hash

        # GPU box 1 materializes the pinned version from S3 and trains; once step 4 is saved, training is frozen
        # until that checkpoint is archived, then the whole box dies
        first = ck.Checkpoint(SAVE_FREQ, f"{SAVE_FREQ:06d}", out_dir / "lerobot" / "checkpoints" / f"{SAVE_FREQ:06d}")
        wait_for(lambda: ck.is_complete(first), 400, "gpu box 1 to save a checkpoint", interval=0.05, why=why)
        os.kill(int((out_dir / "train.pid").read_text()), signal.SIGSTOP)
        assert f"materialized at {gpu1.root / 'cache'}" in gpu1.output(), why()
        wait_for(lambda: s3_json(s3, manifest), 120, "the checkpoint's archive manifest", why=why)
        gpu1.crash()
        assert gpu1.pids() == []
        assert not (out_dir / "lerobot" / "checkpoints" / f"{STEPS:06d}").exists()
        status, r = api(api_url, "GET", f"/flow_runs/{run['id']}")
        assert r["state"]["type"] == "RUNNING", "nobody told the server: the run looks alive"

        # GPU box 2 joins; the server notices the missing heartbeats and reschedules the run for it
        worker2 = gpu2.conveyor("worker", "--pool", "gpu", "--api-url", api_url)
        out_dir2 = gpu2.root / "work" / "runs" / run_name

        def finished():
            status, r = api(api_url, "GET", f"/flow_runs/{run['id']}")
            assert r["state"]["type"] not in ("FAILED", "CRASHED", "CANCELLED"), (r["state"], why())
            return r["state"]["type"] == "COMPLETED" and r

        done = wait_for(finished, 600, "gpu box 2 to finish the run", interval=2, why=why)
        assert worker2.poll() is None
        assert done["run_count"] >= 2
        step = json.loads((out_dir2 / "lerobot/checkpoints" / f"{STEPS:06d}/training_state/training_step.json")
                          .read_text())["step"]
        assert step == STEPS
        logs = sorted((out_dir2 / "logs").glob("train-*.log"))
        assert len(logs) == 1 and "--resume=true" in logs[0].read_text()
        assert f"resuming run {run_name} from archived checkpoint {SAVE_FREQ:06d}" in gpu2.output()
        assert s3_json(s3, f"conveyor/runs/{run_name}/last")["step"] == STEPS

        # lineage: both machines trained on exactly the version the run was pinned to, each from its own cache
        assert Store.open(store).version == v2 and v2.total_episodes == 5
        run_doc = s3_json(s3, f"conveyor/runs/{run_name}/run.json")
        assert run_doc["final_step"] == STEPS
        assert run_doc["dataset"]["version"] == v1.to_dict()
        assert s3_json(s3, f"conveyor/runs/{run_name}/dataset.json")["version"] == v1.to_dict()
        assert run_doc["dataset"]["root"].startswith(str(gpu2.root / "cache"))
        before = s3_json(s3, manifest)
        assert before["dataset"]["version"]["content_hash"] == v1.content_hash
        assert before["dataset"]["root"].startswith(str(gpu1.root / "cache"))
        assert f"materialized at {gpu2.root / 'cache'}" in gpu2.output()
        assert not (gpu2.root / "stores" / name).exists(), "the GPU boxes never saw the store"
    finally:
        codes = {m.root.name: m.stop() for m in machines}
    assert codes == {"recording-pc": [0], "gpu-box-1": [-9], "gpu-box-2": [0]}, (codes, why())
    assert [m.pids() for m in machines] == [[], [], []], "no orphan processes on any machine"
    assert "conveyor worker: stopped" in gpu2.output()


def test_two_recording_pcs_each_run_their_own_watcher_ingests_and_schedules(postgres_prefect_server, s3_endpoint,
                                                                             tmp_path):
    """Two recording PCs join one server, each with its own recorder and store_root. The cpu flows need the
    machine's files, so each PC registers them as `<flow>/<flow> on <machine>` on its own work queue and its cpu worker
    polls only that queue: each PC's watch run, and so its episodes, stays on that PC. A leftover cpu
    deployment on the default queue (served by no conveyor worker) is pointed out when a PC joins."""
    api_url = postgres_prefect_server.api_url
    pcs = {}
    for rig in ("rig-a", "rig-b"):
        pcs[rig] = Machine(tmp_path / rig, s3_endpoint, extra=f'machine = "{rig}"\n' + recording_pc(f"grasp-{rig}"))

    def why() -> str:
        return "\n".join(m.output(tail=4000) for m in pcs.values())

    try:
        a = pcs["rig-a"].conveyor("up", "--api-url", api_url, "--pools", "cpu")
        wait_for(lambda: "conveyor is up" in pcs["rig-a"].output() or a.poll() is not None, 240, "rig-a up", why=why)
        # a cpu deployment from an older conveyor (or prefect.yaml deployed by hand): the default queue
        status, flow = api(api_url, "POST", "/flows/", {"name": "nightly"})
        status, legacy = api(api_url, "POST", "/deployments/", {"name": "nightly", "flow_id": flow["id"],
                                                                "work_pool_name": "cpu"})
        assert status in (200, 201), legacy
        b = pcs["rig-b"].conveyor("up", "--api-url", api_url, "--pools", "cpu")
        wait_for(lambda: "conveyor is up" in pcs["rig-b"].output() or b.poll() is not None, 240, "rig-b up", why=why)
        assert a.poll() is None and b.poll() is None, why()
        assert "note: deployment nightly/nightly sends its runs to pool cpu's default queue" in pcs["rig-b"].output()

        for rig, pc in pcs.items():
            w = RecordingWriter(pc.root / "rec", SPEC)
            for ep in range(2):
                w.write_episode(ep, LEN)
        for rig, pc in pcs.items():
            store = pc.root / "stores" / f"grasp-{rig}"
            wait_for(lambda: store.is_dir() and Store.open(store).version.total_episodes == 2, 120,
                     f"{rig}'s two episodes in its own store", why=why)
            assert sorted(p.name for p in (pc.root / "stores").iterdir()) == [f"grasp-{rig}"]

        status, deps = api(api_url, "POST", "/deployments/filter", {"work_pools": {"name": {"any_": ["cpu"]}}})
        status, flows = api(api_url, "POST", "/flows/filter", {})
        flow_name = {f["id"]: f["name"] for f in flows}
        got = {(flow_name[d["flow_id"]], d["name"], d["work_queue_name"]) for d in deps
               if d["work_queue_name"] in pcs or d["name"] == "nightly"}  # the server holds other tests' too
        assert got == {(f, f"{f} on {rig}", rig) for f in ("watch", "ingest", "curate", "nightly", "backup")
                      for rig in pcs} | \
            {("nightly", "nightly", "default")}
        running = {"flows": {"name": {"any_": ["watch"]}}, "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}
        status, runs = api(api_url, "POST", "/flow_runs/filter", running)
        assert sorted(r["work_queue_name"] for r in runs if r["work_queue_name"] in pcs) == ["rig-a", "rig-b"], runs
    finally:
        codes = {rig: pc.stop() for rig, pc in pcs.items()}
    assert codes == {"rig-a": [0], "rig-b": [0]}, (codes, why())
    assert [pc.pids() for pc in pcs.values()] == [[], []], "no orphan processes on any machine"
