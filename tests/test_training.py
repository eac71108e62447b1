"""Training end to end on CPU, offline, with real lerobot-train, a real Prefect server and a real S3 server.

The store is converted from a generated v2.1 recording with Chinese task text; SmolVLA uses a tiny SmolVLM
folder built here (tests/tiny_smolvlm.py), ACT trains its ResNet backbone from scratch (no weight download).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import pytest

from conveyor.errors import ConveyorError
from conveyor.training import checkpoints as ck
from conveyor.training.request import TrainRequest
from tiny_smolvlm import build_tiny_smolvlm

TASK = "抓取方块"
LEROBOT = metadata.version("lerobot")          # the default lab environment is conveyor's own
TINY_SMOLVLA = {"policy.load_vlm_weights": False, "policy.num_vlm_layers": 2,
                "policy.resize_imgs_with_padding": "[64,64]", "policy.chunk_size": 5, "policy.n_action_steps": 5}
TINY_ACT = {"policy.pretrained_backbone_weights": None, "policy.dim_model": 32, "policy.dim_feedforward": 64,
            "policy.n_heads": 2, "policy.n_encoder_layers": 1, "policy.n_decoder_layers": 1,
            "policy.n_vae_encoder_layers": 1, "policy.chunk_size": 5, "policy.n_action_steps": 5}


@pytest.fixture(scope="session")
def env(session_tmp, prefect_server):
    """A conveyor.toml with one store converted from a synth recording, a tiny SmolVLM, a file:// archive."""
    from conveyor.ingest import convert
    from conveyor.synthetic.recording import CameraSpec, RecordingSpec, write_recording

    base = session_tmp / "training"
    spec = RecordingSpec(fps=10, cameras=(CameraSpec("observation.images.cam", height=48, width=64,
                                                     codec="h264"),))
    rec = write_recording(base / "rec", episodes=3, lengths=16, tasks=TASK, spec=spec)
    convert(rec, base / "stores" / "grasp")
    vlm = build_tiny_smolvlm(base / "tiny_smolvlm")
    config = base / "conveyor.toml"
    config.write_text(f'store_root = "{base / "stores"}"\nwork_dir = "{base / "work"}"\n'
                      f'storage_url = "file://{base / "objects"}"\n')
    return {"base": base, "config": str(config), "vlm": vlm, "store": base / "stores" / "grasp",
            "objects": base / "objects"}


def smolvla(env, **kw) -> TrainRequest:
    fields = dict(store="grasp", policy_type="smolvla", vlm_model_name=str(env["vlm"]), device="cpu",
                  batch_size=2, num_workers=0, log_freq=1, steps=4, save_freq=2, options=dict(TINY_SMOLVLA))
    fields.update(kw)
    return TrainRequest(**fields)


def run_flow(env, request: TrainRequest, retries: int = 0) -> dict:
    from flows.train import train

    return train.with_options(retries=retries, retry_delay_seconds=0)(request=request, config=env["config"])


def api(prefect_server, method: str, path: str, body: dict | None = None):
    import httpx

    r = httpx.request(method, prefect_server.api_url + path, json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def flow_runs(prefect_server, flow_name: str) -> list[dict]:
    return api(prefect_server, "POST", "/flow_runs/filter",
               {"flows": {"name": {"any_": [flow_name]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 50})


# ------------------------------------------------------------------ training runs


@pytest.fixture(scope="session")
def vla_zh(env, prefect_server) -> dict:
    """The tiny SmolVLA run `vla-zh` (4 steps, archived), trained once per session for the tests that need it."""
    return run_flow(env, smolvla(env, run_name="vla-zh"))


@pytest.mark.lerobot
@pytest.mark.slow
def test_smolvla_trains_on_chinese_task_and_archives(env, prefect_server, vla_zh):
    import pyarrow.parquet as pq

    assert TASK in pq.read_table(env["store"] / "meta/tasks.parquet").to_pandas().index
    result = vla_zh
    out = Path(result["output_dir"])
    assert result["final_step"] == 4 and result["started_from"] == 0 and result["returncode"] == 0
    done = [c.name for c in ck.local_checkpoints(out / "lerobot") if ck.is_complete(c)]
    assert done == ["000002", "000004"]
    assert (out / "loss.png").stat().st_size > 1000 and result["loss_plot"] == str(out / "loss.png")
    log = Path(result["log_path"]).read_text()
    assert "step:4 " in log and "End of training" in log
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(m["loss"] > 0 for m in metrics)
    # archived, manifest last, pointer moved, lineage recorded
    objects = env["objects"] / "runs" / "vla-zh"
    manifest = json.loads((objects / "checkpoints/000004/manifest.json").read_text())
    assert set(manifest["files"]) >= set(ck.REQUIRED)
    assert manifest["dataset"]["version"]["total_episodes"] == 3
    assert manifest["dataset"]["version"]["content_hash"]
    assert json.loads((objects / "last").read_text()) == {"step": 4, "name": "000004"}
    run_json = json.loads((objects / "run.json").read_text())
    assert run_json["final_step"] == 4 and run_json["train_config"]["steps"] == 4
    assert run_json["versions"]["lerobot"] == LEROBOT and run_json["versions"]["torch"]
    assert run_json["lerobot_train"].endswith("lerobot-train")
    # recorded on the server, with artifacts
    runs = [r for r in flow_runs(prefect_server, "train") if r["parameters"]["request"]["run_name"] == "vla-zh"]
    assert runs and runs[0]["state_type"] == "COMPLETED"
    arts = api(prefect_server, "POST", "/artifacts/filter",
               {"artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]}}})
    assert {a["type"] for a in arts} >= {"progress", "table", "markdown"}
    progress = [a for a in arts if a["type"] == "progress"]
    assert progress and float(progress[0]["data"]) == 100.0


@pytest.mark.lerobot
@pytest.mark.slow
def test_same_run_name_again_says_finished(env, prefect_server, vla_zh, capsys):
    from conveyor.cli import main

    capsys.readouterr()
    rc = main(["--config", env["config"], "train", "--store", "grasp", "--policy-type", "smolvla",
               "--vlm-model-name", str(env["vlm"]), "--device", "cpu", "--steps", "4", "--save-freq", "2",
               "--batch-size", "2", "--num-workers", "0", "--run-name", "vla-zh",
               *[a for k, v in TINY_SMOLVLA.items() for a in ("--set", f"{k}={str(v).lower()}")]])
    assert rc == 0
    assert "run vla-zh already finished at step 4" in capsys.readouterr().out


@pytest.mark.lerobot
@pytest.mark.slow
def test_act_trains_and_evaluates(env, prefect_server, capsys):
    from conveyor.cli import main

    result = run_flow(env, TrainRequest(store="grasp", policy_type="act", device="cpu", batch_size=2,
                                        num_workers=0, log_freq=1, steps=3, save_freq=3, archive=False,
                                        run_name="act-tiny", options=dict(TINY_ACT)))
    assert result["final_step"] == 3 and result["archived"] == []
    cfg = json.loads((Path(result["output_dir"]) / "lerobot/checkpoints/000003/pretrained_model/config.json")
                     .read_text())
    assert cfg["type"] == "act" and cfg["pretrained_backbone_weights"] is None
    assert main(["--config", env["config"], "evaluate", "act-tiny", "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "act-tiny step 3 (act), episodes [2] (seen in training)" in out
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["joint", "MAE", "MSE"])
    rows = [ln.split() for ln in lines[head + 1:head + 8]]
    assert rows[-1][0] == "all" and len(rows) == 7           # 6 joints + all
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)


def _cli_train(env, run_name: str, *extra: str) -> list[str]:
    """`conveyor train` of a tiny ACT on CPU, as a person types it (the console script, a real terminal's
    output on stdout/stderr)."""
    opts = [a for k, v in TINY_ACT.items() for a in ("--set", f"{k}={'null' if v is None else v}")]
    return [str(Path(sys.executable).parent / "conveyor"), "--config", env["config"], "train", "--store", "grasp",
            "--policy-type", "act", "--device", "cpu", "--log-freq", "1", "--run-name", run_name, "--no-archive",
            *opts, *extra]


def _run_state(prefect_server, run_name: str) -> str:
    runs = [r for r in flow_runs(prefect_server, "train") if r["parameters"]["request"]["run_name"] == run_name]
    return runs[0]["state_type"] if runs else "NONE"


@pytest.mark.lerobot
@pytest.mark.slow
def test_cli_terminal_shows_the_plan_progress_and_link_only(env, prefect_server):
    """A CPU run's terminal: the plan, where lerobot's output goes, step/loss lines, the UI link and the
    result; no lerobot output, no traceback (torchcodec is never tried). A bad option is one line."""
    r = subprocess.run(_cli_train(env, "act-quiet", "--steps", "4", "--save-freq", "4"), capture_output=True,
                       text=True, timeout=900)
    lines = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 0, lines[-5:]
    assert "Traceback" not in r.stdout + r.stderr and len(lines) <= 10, lines
    assert lines[0].startswith("in the UI: http"), "the link, once preflight passed"
    assert lines[1].startswith("run act-quiet: act on grasp c1-") and "recipe cpu" in lines[1]
    assert "/runs/flow-run/" in lines[0] and "/v2/" not in lines[0], "the UI the logs' `View at` opens"
    assert [ln.split(" (")[0] for ln in lines if ln.startswith("step ")] == [f"step {i}/4" for i in (1, 2, 3, 4)]
    assert lines[-1].startswith("run act-quiet finished at step 4 (fresh)")
    named = [r["name"] for r in flow_runs(prefect_server, "train") if r["parameters"]["request"]["run_name"] == "act-quiet"]
    assert named == ["act on grasp c1, 4 steps"], "a train run is named after policy, store, version and steps"
    log = next((env["base"] / "work/runs/act-quiet/logs").glob("train-*.log")).read_text()
    assert "--dataset.video_backend=" in log and "libtorchcodec" not in log and "End of training" in log

    bad = subprocess.run(_cli_train(env, "act-bad", "--steps", "4", "--set", "policy.no_such_option=1"),
                         capture_output=True, text=True, timeout=900)
    assert bad.returncode == 1 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert "policy.no_such_option" in bad.stderr
    usage = subprocess.run(_cli_train(env, "act-usage", "--set", "policy.dim_model"), capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 2 and usage.stdout == "" and len(usage.stderr.splitlines()) == 1, usage.stderr


@pytest.mark.lerobot
@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_an_ended_cli_run_does_not_stay_running(env, prefect_server, how):
    """Ctrl-C or SIGTERM: the run ends Crashed/Cancelled and lerobot-train is stopped. kill -9: the server
    cannot be told; the next `conveyor train` on this machine marks the run Crashed."""
    name = f"act-{how.lower()}"
    out = env["base"] / "work/runs" / name
    proc = subprocess.Popen(_cli_train(env, name, "--steps", "100000", "--save-freq", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 900
    while not (out / "metrics.jsonl").exists():       # lerobot-train is past its first step
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.5)
    child = int((out / "train.pid").read_text())
    assert _run_state(prefect_server, name) == "RUNNING"
    os.kill(proc.pid, getattr(signal, how))
    text = proc.communicate(timeout=300)[0]
    if how == "SIGKILL":
        os.kill(child, signal.SIGKILL)             # its own session: the kill -9 of the CLI does not reach it
        assert _run_state(prefect_server, name) == "RUNNING"
        refused = subprocess.run(_cli_train(env, f"{name}-next", "--set", "dataset.single_task=x"),
                                 capture_output=True, text=True, timeout=900)
        assert refused.returncode == 1
    else:
        assert "Traceback" not in text and len(text.splitlines()) <= 8, text
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:   # stopped, not orphaned
            time.sleep(0.2)
        assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert _run_state(prefect_server, name) in ("CRASHED", "CANCELLED")


@pytest.mark.lerobot
@pytest.mark.slow
def test_killed_training_resumes_on_flow_retry(env, prefect_server):
    request = smolvla(env, run_name="vla-kill", steps=12, save_freq=3)
    out = env["base"] / "work/runs/vla-kill"
    killed: dict = {}

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            first = [c for c in ck.local_checkpoints(out / "lerobot") if ck.is_complete(c)]
            pid_file = out / "train.pid"
            if first and pid_file.exists():
                killed["at"] = first[-1].step
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = run_flow(env, request, retries=1)
    t.join(5)
    assert killed and killed["at"] < 12, "the first attempt was never killed"
    assert result["final_step"] == 12 and result["started_from"] >= killed["at"] > 0
    logs = sorted((out / "logs").glob("train-*.log"))
    assert len(logs) == 2
    first, second = logs[0].read_text(), logs[1].read_text()
    assert "End of training" not in first and "exited with code -9" in first
    assert "--resume=true" in second and "End of training" in second
    assert json.loads((out / "lerobot/checkpoints/000012/training_state/training_step.json").read_text())["step"] == 12
    runs = [r for r in flow_runs(prefect_server, "train") if r["parameters"]["request"]["run_name"] == "vla-kill"]
    assert runs[0]["state_type"] == "COMPLETED" and runs[0]["run_count"] == 2


@pytest.mark.lerobot
@pytest.mark.slow
def test_resume_from_s3_archive_on_another_machine(env, prefect_server, s3_endpoint):
    """Output dir gone and the VLM folder moved: the retry downloads, verifies, rewrites paths, resumes."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="ckpts")
    cfg = env["base"] / "s3.toml"
    cfg.write_text(Path(env["config"]).read_text().replace(f'file://{env["objects"]}', "s3://ckpts/conveyor")
                   + f'\n[s3]\nendpoint_url = "{s3_endpoint}"\naddressing_style = "path"\n')
    s3env = {**env, "config": str(cfg)}
    first = run_flow(s3env, smolvla(env, run_name="vla-s3", steps=3, save_freq=3))
    assert first["archived"] == ["000003"]
    shutil.rmtree(first["output_dir"])                         # "another machine": nothing local
    moved_vlm = shutil.copytree(env["vlm"], env["base"] / "elsewhere" / "smolvlm")
    new_out = env["base"] / "machine2" / "vla-s3"
    second = run_flow(s3env, smolvla(env, run_name="vla-s3", steps=6, save_freq=3, vlm_model_name=str(moved_vlm),
                                     output_dir=str(new_out)))
    assert second["started_from_archive"] and second["started_from"] == 3 and second["final_step"] == 6
    assert any("output_dir" not in c and str(moved_vlm) in c for c in second["path_rewrites"])
    saved = json.loads((new_out / "lerobot/checkpoints/000006/pretrained_model/train_config.json").read_text())
    assert saved["output_dir"] == str(new_out / "lerobot")
    assert saved["policy"]["vlm_model_name"] == str(moved_vlm)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ckpts", Prefix="conveyor/runs/vla-s3/")["Contents"]}
    assert {"conveyor/runs/vla-s3/checkpoints/000006/manifest.json", "conveyor/runs/vla-s3/last"} <= keys
    last = s3.get_object(Bucket="ckpts", Key="conveyor/runs/vla-s3/last")["Body"].read()
    assert json.loads(last)["step"] == 6


# ------------------------------------------------------------------ metric lines (real output, both versions)

BAR = "Training:  50%|\u2588\u2588\u2588\u2588\u2588     | 1/2 [00:13<00:13, 13.37s/step]"
LINES = {  # what lerobot-train printed for a tiny ACT here, after tqdm's bar on the same physical line
    "0.4.4": "INFO 2026-11-25 21:58:38 ot_train.py:435 step:1 smpl:2 ep:0 epch:0.04 loss:74.946 grdn:253.335 "
             "lr:1.0e-05 updt_s:13.225 data_s:0.149",
    "0.6.1": "INFO 2026-11-25 21:27:36 ot_train.py:641 step:1 smpl:2 ep:0 epch:0.04 loss:72.144 grdn:260.996 "
             "lr:1.0e-05 updt_s:1.998 data_s:0.032 smp/s:1 l1_loss:0.833 kld_loss:7.131",
}


@pytest.mark.parametrize("version", sorted(LINES))
def test_metric_line_parses_after_the_progress_bar(version, tmp_path):
    import io

    from conveyor.training.lerobot_train import RunResult, _handle, parse_metrics

    m = parse_metrics(LINES[version], batch_size=2, expected_step=1)
    fields = LINES[version].split()
    want = {k: float(v) for k, v in (f.split(":", 1) for f in fields[4:]) if k in ("loss", "grdn", "lr", "epch")}
    assert (m.step, m.loss, m.grad_norm, m.lr, m.epoch) == (1, want["loss"], want["grdn"], want["lr"], want["epch"])
    assert m.samples_per_s == pytest.approx(2 / (m.update_s + m.data_s))
    seen, shown, log = [], [], io.StringIO()
    result = RunResult(returncode=0, log_path=tmp_path / "x.log")
    nxt = _handle(BAR + LINES[version], log, result, 2, 1, 1, shown.append, seen.append)
    assert nxt == 2 and [x.step for x in seen] == [1] and shown == [LINES[version]]
    assert log.getvalue() == BAR + "\n" + LINES[version] + "\n"
    assert parse_metrics(LINES[version].replace("step:1 ", "step:2K "), 2, 2000).step == 2000


# ------------------------------------------------------------------ archive integrity (no training)


def _write_checkpoint(dst: Path, step: int) -> None:
    """The files lerobot-train writes for one checkpoint (layout of 0.4.4 and 0.6.x), with stand-in tensors."""
    for rel in ck.REQUIRED + ("pretrained_model/policy_preprocessor.json", "training_state/scheduler_state.json"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(os.urandom(256) if rel.endswith(".safetensors") else b"{}")
    (dst / "training_state/training_step.json").write_text(json.dumps({"step": step}))
    (dst / "pretrained_model/train_config.json").write_text(json.dumps({"steps": 4, "output_dir": str(dst.parents[1])}))


@pytest.fixture
def checkpoint(tmp_path) -> ck.Checkpoint:
    """A complete local checkpoint 000002 with `last` pointing at it (no training needed)."""
    dst = tmp_path / "lerobot/checkpoints/000002"
    _write_checkpoint(dst, 2)
    (dst.parent / "last").symlink_to("000002")
    assert ck.is_complete(ck.Checkpoint(2, "000002", dst))
    return ck.Checkpoint(2, "000002", dst)


def test_partial_upload_is_never_a_checkpoint(checkpoint, tmp_path):
    from conveyor.repo import open_repo

    ckpt = checkpoint
    objects = open_repo(f"file://{tmp_path / 'objects'}")
    ck.archive_checkpoint(objects, "p", ckpt, {"dataset": None})
    # an interrupted upload of step 4: every file but no manifest, and a pointer that already moved
    for f in sorted(p for p in ckpt.path.rglob("*") if p.is_file()):
        objects.put_file(f, f"runs/p/checkpoints/000004/{f.relative_to(ckpt.path).as_posix()}")
    objects.put_bytes("runs/p/last", json.dumps({"step": 4, "name": "000004"}).encode())
    assert ck.archived(objects, "p") == {"000002": 2}
    assert ck.newest_archived(objects, "p") == ("000002", 2)
    got = ck.download_checkpoint(objects, "p", "000002", tmp_path / "machine2")
    assert ck.is_complete(got) and (tmp_path / "machine2/checkpoints/last").resolve() == got.path.resolve()
    # a corrupted object is refused on download, and nothing half-written is left behind
    (tmp_path / "objects/runs/p/checkpoints/000002/training_state/training_step.json").write_text('{"step": 99}')
    with pytest.raises(ConveyorError):
        ck.download_checkpoint(objects, "p", "000002", tmp_path / "machine3")
    assert not (tmp_path / "machine3/checkpoints/000002").exists()


def test_incomplete_local_checkpoint_is_ignored(checkpoint, tmp_path):
    ckpt = checkpoint
    half = ckpt.path.parent / "000004"
    shutil.copytree(ckpt.path / "pretrained_model", half / "pretrained_model")   # killed before training_state
    assert ck.newest_local(tmp_path / "lerobot").step == 2
    assert ck.drop_incomplete(tmp_path / "lerobot", log=lambda m: None) == ["000004"]
    (ckpt.path.parent / "last").unlink()                        # saved, but `last` never moved: not trusted
    assert ck.newest_local(tmp_path / "lerobot") is None


@pytest.mark.lerobot
def test_resume_across_the_06_config_line_is_refused(env, settings, checkpoint):
    """A checkpoint whose train_config.json uses the other side's names (eval_freq vs env_eval_freq)."""
    from conveyor.training.attempt import resume_args
    from conveyor.training.preflight import preflight

    plan = preflight(smolvla(env), settings, run_name="generations")
    cfg = json.loads(checkpoint.train_config.read_text())
    theirs = "eval_freq" if plan.lerobot.uses_06_names else "env_eval_freq"
    checkpoint.train_config.write_text(json.dumps({**cfg, theirs: 20000}))
    with pytest.raises(ConveyorError) as e:
        resume_args(plan, checkpoint)
    assert e.value.path == str(checkpoint.train_config)
    assert e.value.problem.startswith("checkpoint 000002 was written by a lerobot ")
    assert e.value.problem.endswith(f"and this run's lerobot is {LEROBOT}; resume it with the lerobot that wrote "
                                    "it, or start a new run_name.")


# ------------------------------------------------------------------ preflight refusals


@pytest.fixture(scope="session")
def settings(env):
    from conveyor.settings import load_settings

    return load_settings(env["config"])


@pytest.mark.lerobot
@pytest.mark.parametrize("change, where, sentence", [
    ({"options": {"dataset.single_task": "抓取方块"}}, "--dataset.single_task",
     f"`--dataset.single_task` is not a lerobot-train option in {LEROBOT}; set the task at ingest."),
    ({"options": {"optimizer.gradient_accumulation_steps": 4}}, "--optimizer.gradient_accumulation_steps",
     f"`--optimizer.gradient_accumulation_steps` does not exist in lerobot {LEROBOT}; lower batch_size or use the "
     "light recipe instead."),
    ({"options": {"job.target": "a10g-small"}}, "--job.target",
     "`--job.*` runs lerobot-train on Hugging Face Jobs; conveyor runs it on its own work pool."),
    ({"options": {"policy.push_to_hub": True}}, "--policy.push_to_hub",
     "`policy.push_to_hub=true` needs `policy.repo_id`; set one or leave push_to_hub off (conveyor's default)."),
    ({"options": {"steps": 10}}, "--steps", "`--steps` is set from the request; use the `steps` field."),
    ({"vlm_model_name": "/nonexistent/smolvlm"}, "/nonexistent/smolvlm",
     "`vlm_model_name` is not a local SmolVLM folder (config, tokenizer, processor); runs are offline "
     "(HF_HUB_OFFLINE=1), so download it and set vlm_model_name to the folder."),
    ({"vlm_model_name": None}, "HuggingFaceTB/SmolVLM2-500M-Video-Instruct", "`vlm_model_name` is not a local"),
    ({"policy_path": "lerobot/smolvla_base"}, "lerobot/smolvla_base",
     "policy_path is not a local pretrained policy folder with a config.json; runs are offline"),
    ({"store": "no-such-store"}, "no-such-store", "no store named `no-such-store` under"),
    ({"dataset_version": "999"}, None, "dataset version `999` of `grasp` is not published"),
    ({"options": {"policy.not_a_field": 1}}, "options",
     f"the options do not parse as a lerobot {LEROBOT} train config:"),
])
def test_preflight_refuses_with_one_sentence(env, settings, change, where, sentence):
    from conveyor.training.preflight import preflight

    with pytest.raises(ConveyorError) as e:
        preflight(smolvla(env, **change), settings, run_name="refused")
    assert sentence in e.value.problem, e.value.problem
    if where:
        assert e.value.path == where
    assert "\n" not in e.value.problem


@pytest.mark.lerobot
def test_preflight_refuses_cuda_without_cuda(env, settings):
    import torch

    from conveyor.training.preflight import preflight

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConveyorError) as e:
        preflight(smolvla(env, device="cuda"), settings, run_name="refused")
    assert e.value.problem == ("CUDA was requested but is not available on this machine; run on the `gpu` work "
                               "pool or set device=cpu.")


@pytest.mark.lerobot
def test_preflight_refuses_act_imagenet_backbone_offline(env, settings, tmp_path, monkeypatch):
    from conveyor.training.preflight import preflight

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))   # an empty cache, not a mock
    with pytest.raises(ConveyorError) as e:
        preflight(TrainRequest(store="grasp", policy_type="act", device="cpu"), settings, run_name="refused")
    assert "policy.pretrained_backbone_weights=null" in e.value.problem


@pytest.mark.lerobot
def test_preflight_plan(env, settings):
    from conveyor.training.preflight import preflight

    plan = preflight(smolvla(env, recipe="light"), settings, run_name="planned")
    assert plan.recipe == "light" and plan.video_backend == "pyav" and plan.batch_size == 2
    assert plan.dataset_version is not None and plan.dataset_version.total_episodes == 3
    args = dict(a[2:].split("=", 1) for a in plan.args)
    assert args["policy.push_to_hub"] == "false" and args["dataset.root"] == str(plan.dataset_root)
    assert plan.dataset_root.is_relative_to(settings.cache_dir), "lerobot reads the materialized version"
    assert args["policy.chunk_size"] == "5"                     # the user's option beats the light recipe
    assert args["output_dir"] == str(settings.work_dir / "runs/planned/lerobot")
    assert plan.env["HF_HUB_OFFLINE"] == "1"
    assert plan.lerobot.version == LEROBOT and plan.lerobot.same_as_conveyor
    assert plan.lab_versions["lerobot"] == LEROBOT and plan.option_notes == []


@pytest.mark.lerobot
def test_preflight_passes_renamed_options_under_the_labs_name(env, settings):
    from conveyor.training.preflight import preflight

    plan = preflight(smolvla(env, options={**TINY_SMOLVLA, "eval_freq": 0}), settings, run_name="renamed")
    args = dict(a[2:].split("=", 1) for a in plan.args)
    if plan.lerobot.uses_06_names:
        assert args["env_eval_freq"] == "0" and "eval_freq" not in args
        assert plan.option_notes == [f"`eval_freq` is `env_eval_freq` in lerobot {LEROBOT}: passed as "
                                     "`env_eval_freq`"]
    else:
        assert args["eval_freq"] == "0" and plan.option_notes == []


def _fake_lab_env(root: Path, version: str) -> Path:
    """A real venv whose installed lerobot metadata says `version`, with a lerobot-train script in it."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next(root.glob("lib/python*/site-packages"))
    dist = site / f"lerobot-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lerobot\nVersion: {version}\n")
    exe = root / "bin/lerobot-train"
    exe.write_text(f"#!{root / 'bin/python'}\nraise SystemExit('not a real lerobot-train')\n")
    exe.chmod(0o755)
    return exe


@pytest.mark.lerobot
def test_preflight_refuses_a_lerobot_outside_the_supported_range(env, tmp_path):
    from conveyor.settings import load_settings
    from conveyor.training.preflight import preflight

    exe = _fake_lab_env(tmp_path / "lab", "0.3.3")
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(Path(env["config"]).read_text() + f'\n[training]\nlerobot_train = "{exe}"\n')
    with pytest.raises(ConveyorError) as e:
        preflight(smolvla(env), load_settings(cfg), run_name="old")
    assert e.value.path == str(exe)
    assert e.value.problem == ("lerobot 0.3.3 is outside the supported range (0.4.4 to 0.6.x); install a "
                               "supported lerobot in that environment.")
    cfg.write_text(Path(env["config"]).read_text() + '\n[training]\nlerobot_train = "lab/bin/nothing-here"\n')
    with pytest.raises(ConveyorError) as e:
        preflight(smolvla(env), load_settings(cfg), run_name="old")
    assert e.value.path == str(tmp_path / "lab/bin/nothing-here")      # relative to the config file
    assert e.value.problem.startswith("no lerobot-train here; set training.lerobot_train")


# ------------------------------------------------------------------ deployment form


def _gpu_pool() -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async def pool():
        async with get_client() as c:
            try:
                await c.create_work_pool(WorkPoolCreate(name="gpu", type="process"))
            except Exception:  # noqa: BLE001 -- already there from another test
                pass

    asyncio.run(pool())


def test_deployment_parameter_schema_is_the_request_form(prefect_server):
    from flows.train import train

    _gpu_pool()
    train.to_deployment(name="train", work_pool_name="gpu").apply()
    dep = api(prefect_server, "GET", "/deployments/name/train/train")
    schema = dep["parameter_openapi_schema"]
    assert schema["required"] == ["request"]
    form = schema["definitions"]["TrainRequest"]["properties"]
    assert set(form) == set(TrainRequest.model_fields)
    for name, field in TrainRequest.model_fields.items():
        assert form[name].get("description", "").startswith(field.description), name  # + known stores
    assert form["policy_type"]["enum"] == ["smolvla", "act", "diffusion", "pi0"]
    assert form["policy_type"]["default"] == "smolvla"
    assert form["recipe"]["enum"] == ["auto", "light", "standard"] and form["recipe"]["default"] == "auto"
    assert form["device"]["enum"] == ["cuda", "cpu"]
    assert form["steps"]["default"] == 20000 and form["steps"]["minimum"] == 1
    assert form["archive"]["default"] is True


@pytest.mark.lerobot
def test_recipe_fits_the_machine():
    """auto on CPU is a smoke run (batch 4, no worker processes); workers never exceed the cores this process
    may use, whatever the recipe or the request says."""
    from conveyor.training.recipes import choose_recipe, cores

    cpu = choose_recipe(TrainRequest(store="s", device="cpu"), "act", None)
    assert (cpu.name, cpu.batch_size, cpu.num_workers) == ("cpu", 4, 0)
    assert choose_recipe(TrainRequest(store="s", device="cpu", batch_size=2, num_workers=1), "act", None) \
        .batch_size == 2
    gpu = choose_recipe(TrainRequest(store="s"), "act", 40.0)
    assert (gpu.name, gpu.batch_size, gpu.num_workers) == ("standard", 16, min(4, cores()))
    many = choose_recipe(TrainRequest(store="s", num_workers=64), "act", 40.0)
    assert many.num_workers == cores() == len(os.sched_getaffinity(0)) and "cores this run has" in many.reason


def test_the_form_accepts_null_and_empty_optional_fields(prefect_server):
    """Every optional field may be null (a cleared input, an API call) and the form's own submission (empty
    text inputs, number inputs left out) is accepted: by the JSON schema validator Prefect runs on the
    deployment's parameter schema, by the server when it creates the run, and by the flow's own model."""
    import httpx
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from flows.train import train

    optional = [n for n, f in TrainRequest.model_fields.items() if not f.is_required() and f.default is None]
    assert {"vlm_model_name", "policy_path", "dataset_version", "batch_size", "num_workers", "run_name",
            "output_dir", "archive_url"} <= set(optional)
    nulls = {"request": {"store": "grasp", **dict.fromkeys(optional)}, "config": None}
    form = {"request": {"store": "grasp", "policy_type": "act", "recipe": "auto", "device": "cpu", "gpus": 1,
                        "steps": 20, "save_freq": 5000, "log_freq": 100, "seed": 1000, "archive": True,
                        "options": {}, **{n: "" for n in optional
                                          if "string" == TrainRequest.model_json_schema()["properties"][n]["type"]}},
            "config": ""}
    schema = parameter_schema(train).model_dump_for_openapi()
    props = schema["definitions"]["TrainRequest"]["properties"]
    assert all("anyOf" not in props[n] and "default" not in props[n] for n in optional), "a plain input"
    assert schema["properties"]["config"]["default"] == "", "a text input, not 'Property is type None'"
    for params in (nulls, form):
        assert validate(params, schema, raise_on_error=True) == []
    _gpu_pool()
    train.to_deployment(name="train", work_pool_name="gpu").apply()
    dep = api(prefect_server, "GET", "/deployments/name/train/train")
    assert dep["enforce_parameter_schema"]
    for params in (nulls, form):
        run = api(prefect_server, "POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})
        assert run["state_type"] == "SCHEDULED"
        httpx.delete(f"{prefect_server.api_url}/flow_runs/{run['id']}", timeout=30).raise_for_status()
        request = train.validate_parameters(params)["request"]
        assert request.store == "grasp" and all(getattr(request, n) is None for n in optional)
    with pytest.raises(Exception, match="409"):   # the schema still types what is set
        api(prefect_server, "POST", f"/deployments/{dep['id']}/create_flow_run",
            {"parameters": {"request": {"store": "grasp", "batch_size": "four"}}})


def test_refused_request_fails_once_without_retries(env, prefect_server):
    """A preflight refusal is final: the flow's retries (meant for resuming) are not spent on it."""
    request = smolvla(env, run_name="refused-once", options={**TINY_SMOLVLA, "dataset.single_task": "x"})
    with pytest.raises(ConveyorError, match=f"not a lerobot-train option in {LEROBOT}"):
        run_flow(env, request, retries=2)
    runs = [r for r in flow_runs(prefect_server, "train") if r["parameters"]["request"]["run_name"] == "refused-once"]
    assert [(r["state_type"], r["run_count"]) for r in runs] == [("FAILED", 1)]
