"""Training end to end on CPU, offline, with real lerobot-train, a real Prefect server and a real S3 server.

The store is converted from a generated v2.1 recording with Chinese task text; SmolVLA uses a tiny SmolVLM
folder built here (tests/tiny_smolvlm.py), ACT trains its ResNet backbone from scratch (no weight download).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from conveyor.errors import ConveyorError
from conveyor.training import checkpoints as ck
from conveyor.training.request import TrainRequest
from tiny_smolvlm import build_tiny_smolvlm

TASK = "抓取方块"
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


@pytest.mark.slow
def test_smolvla_trains_on_chinese_task_and_archives(env, prefect_server):
    import pyarrow.parquet as pq

    assert TASK in pq.read_table(env["store"] / "meta/tasks.parquet").to_pandas().index
    result = run_flow(env, smolvla(env, run_name="vla-zh"))
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
    assert run_json["versions"]["lerobot"] == "0.4.4"
    # recorded on the server, with artifacts
    runs = [r for r in flow_runs(prefect_server, "train") if r["parameters"]["request"]["run_name"] == "vla-zh"]
    assert runs and runs[0]["state_type"] == "COMPLETED"
    arts = api(prefect_server, "POST", "/artifacts/filter",
               {"artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]}}})
    assert {a["type"] for a in arts} >= {"progress", "table", "markdown"}
    progress = [a for a in arts if a["type"] == "progress"]
    assert progress and float(progress[0]["data"]) == 100.0


@pytest.mark.slow
def test_same_run_name_again_says_finished(env, prefect_server, capsys):
    from conveyor.cli import main

    if not (env["base"] / "work/runs/vla-zh").exists():
        pytest.skip("needs test_smolvla_trains_on_chinese_task_and_archives")
    rc = main(["--config", env["config"], "train", "--store", "grasp", "--policy-type", "smolvla",
               "--vlm-model-name", str(env["vlm"]), "--device", "cpu", "--steps", "4", "--save-freq", "2",
               "--batch-size", "2", "--num-workers", "0", "--run-name", "vla-zh",
               *[a for k, v in TINY_SMOLVLA.items() for a in ("--set", f"{k}={str(v).lower()}")]])
    assert rc == 0
    assert "run vla-zh already finished at step 4" in capsys.readouterr().out


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


# ------------------------------------------------------------------ archive integrity (no training)


def _fake_run(env, tmp_path) -> ck.Checkpoint:
    """A complete checkpoint from the SmolVLA run if it exists, else skip."""
    src = env["base"] / "work/runs/vla-zh/lerobot/checkpoints/000002"
    if not src.exists():
        pytest.skip("needs test_smolvla_trains_on_chinese_task_and_archives")
    dst = tmp_path / "lerobot/checkpoints/000002"
    shutil.copytree(src, dst)
    (dst.parent / "last").symlink_to("000002")
    return ck.Checkpoint(2, "000002", dst)


def test_partial_upload_is_never_a_checkpoint(env, tmp_path):
    from conveyor.repo import open_repo

    ckpt = _fake_run(env, tmp_path)
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


def test_incomplete_local_checkpoint_is_ignored(env, tmp_path):
    ckpt = _fake_run(env, tmp_path)
    half = ckpt.path.parent / "000004"
    shutil.copytree(ckpt.path / "pretrained_model", half / "pretrained_model")   # killed before training_state
    assert ck.newest_local(tmp_path / "lerobot").step == 2
    assert ck.drop_incomplete(tmp_path / "lerobot", log=lambda m: None) == ["000004"]
    (ckpt.path.parent / "last").unlink()                        # saved, but `last` never moved: not trusted
    assert ck.newest_local(tmp_path / "lerobot") is None


# ------------------------------------------------------------------ preflight refusals


@pytest.fixture(scope="session")
def settings(env):
    from conveyor.settings import load_settings

    return load_settings(env["config"])


@pytest.mark.parametrize("change, where, sentence", [
    ({"options": {"dataset.single_task": "抓取方块"}}, "--dataset.single_task",
     "`--dataset.single_task` is not a lerobot-train option in 0.4.4; set the task at ingest."),
    ({"options": {"optimizer.gradient_accumulation_steps": 4}}, "--optimizer.gradient_accumulation_steps",
     "`--optimizer.gradient_accumulation_steps` does not exist in lerobot 0.4.4; lower batch_size or use the "
     "light recipe instead."),
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
     "the options do not parse as a lerobot 0.4.4 train config:"),
])
def test_preflight_refuses_with_one_sentence(env, settings, change, where, sentence):
    from conveyor.training.preflight import preflight

    with pytest.raises(ConveyorError) as e:
        preflight(smolvla(env, **change), settings, run_name="refused")
    assert sentence in e.value.problem, e.value.problem
    if where:
        assert e.value.path == where
    assert "\n" not in e.value.problem


def test_preflight_refuses_cuda_without_cuda(env, settings):
    import torch

    from conveyor.training.preflight import preflight

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConveyorError) as e:
        preflight(smolvla(env, device="cuda"), settings, run_name="refused")
    assert e.value.problem == ("CUDA was requested but is not available on this machine; run on the `gpu` work "
                               "pool or set device=cpu.")


def test_preflight_refuses_act_imagenet_backbone_offline(env, settings, tmp_path, monkeypatch):
    from conveyor.training.preflight import preflight

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))   # an empty cache, not a mock
    with pytest.raises(ConveyorError) as e:
        preflight(TrainRequest(store="grasp", policy_type="act", device="cpu"), settings, run_name="refused")
    assert "policy.pretrained_backbone_weights=null" in e.value.problem


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


# ------------------------------------------------------------------ deployment form


def test_deployment_parameter_schema_is_the_request_form(prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.train import train

    async def pool():
        async with get_client() as c:
            try:
                await c.create_work_pool(WorkPoolCreate(name="gpu", type="process"))
            except Exception:  # noqa: BLE001 -- already there from another test
                pass

    asyncio.run(pool())
    train.to_deployment(name="train", work_pool_name="gpu").apply()
    dep = api(prefect_server, "GET", "/deployments/name/train/train")
    schema = dep["parameter_openapi_schema"]
    assert schema["required"] == ["request"]
    form = schema["definitions"]["TrainRequest"]["properties"]
    assert set(form) == set(TrainRequest.model_fields)
    for name, field in TrainRequest.model_fields.items():
        assert form[name].get("description") == field.description, name
    assert form["policy_type"]["enum"] == ["smolvla", "act", "diffusion", "pi0"]
    assert form["policy_type"]["default"] == "smolvla"
    assert form["recipe"]["enum"] == ["auto", "light", "standard"] and form["recipe"]["default"] == "auto"
    assert form["device"]["enum"] == ["cuda", "cpu"]
    assert form["steps"]["default"] == 20000 and form["steps"]["minimum"] == 1
    assert form["archive"]["default"] is True


def test_refused_request_fails_once_without_retries(env, prefect_server):
    """A preflight refusal is final: the flow's retries (meant for resuming) are not spent on it."""
    request = smolvla(env, run_name="refused-once", options={**TINY_SMOLVLA, "dataset.single_task": "x"})
    with pytest.raises(ConveyorError, match="not a lerobot-train option in 0.4.4"):
        run_flow(env, request, retries=2)
    runs = [r for r in flow_runs(prefect_server, "train") if r["parameters"]["request"]["run_name"] == "refused-once"]
    assert [(r["state_type"], r["run_count"]) for r in runs] == [("FAILED", 1)]
