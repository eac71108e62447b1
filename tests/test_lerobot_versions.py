"""A store is the contract between lerobot versions: one store made by conveyor loads exactly in lerobot 0.4.4
and in conveyor's own lerobot (0.6.x), and the runner drives a 0.4.4 `lerobot-train` (fresh and resumed).

The 0.4.4 environment is a cached Python 3.11 venv (tests/lerobot_envs.py); the first run on a machine
builds it (a few minutes), later runs reuse it; without python3.11 these tests skip.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import lerobot_envs

TASK = "抓取方块"
DUMP = Path(__file__).with_name("lerobot_dump.py")
TINY_ACT = {"policy.pretrained_backbone_weights": None, "policy.dim_model": 32, "policy.dim_feedforward": 64,
            "policy.n_heads": 2, "policy.n_encoder_layers": 1, "policy.n_decoder_layers": 1,
            "policy.n_vae_encoder_layers": 1, "policy.chunk_size": 5, "policy.n_action_steps": 5}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

pytestmark = [pytest.mark.slow, pytest.mark.lerobot]


@pytest.fixture(scope="session")
def lerobot_044() -> Path:
    """The cached lerobot 0.4.4 venv (built on first use)."""
    venv = lerobot_envs.venv_path()
    if lerobot_envs.installed_version(venv) != lerobot_envs.VERSION and lerobot_envs.python311() is None:
        pytest.skip(f"no python3.11 on PATH to build the lerobot 0.4.4 venv at {venv} "
                    f"(or point ${lerobot_envs.ENV_VAR} at one)")
    return lerobot_envs.ensure(venv)


@pytest.fixture(scope="session")
def store(session_tmp) -> tuple[Path, Path]:
    """(recording, store): a v2.1 recording with Chinese task text, converted by conveyor."""
    from conveyor.ingest import convert
    from conveyor.synthetic.recording import CameraSpec, RecordingSpec, write_recording

    base = session_tmp / "versions"
    spec = RecordingSpec(fps=10, cameras=(CameraSpec("observation.images.cam", height=48, width=64,
                                                     codec="h264"),))
    rec = write_recording(base / "rec", episodes=3, lengths=12, tasks=TASK, spec=spec)
    convert(rec, base / "stores" / "grasp")
    return rec, base / "stores" / "grasp"


def _dump(python: Path | str, root: Path, tmp: Path) -> dict:
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp / "hf")}
    r = subprocess.run([str(python), str(DUMP), str(root)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _source_frames(rec: Path, camera: str) -> list[str]:
    """sha256 of every decoded source frame (RGB, uint8), episode by episode: the ground truth."""
    import av

    out = []
    for mp4 in sorted((rec / "videos/chunk-000" / camera).glob("episode_*.mp4")):
        with av.open(str(mp4)) as c:
            out += [hashlib.sha256(f.to_ndarray(format="rgb24").tobytes()).hexdigest() for f in c.decode(video=0)]
    return out


def test_one_store_loads_exactly_in_lerobot_044_and_06(store, lerobot_044, tmp_path):
    import pyarrow.parquet as pq

    rec, root = store
    old = _dump(lerobot_044 / "bin/python", root, tmp_path)
    new = _dump(sys.executable, root, tmp_path)
    assert old["lerobot"] == "0.4.4" and new["lerobot"] == metadata.version("lerobot")
    assert new["lerobot"].startswith("0.6.")
    assert old["len"] == new["len"] == 36 and old["episodes"] == new["episodes"] == 3
    # rows: what each version returns is the store's parquet, value for value
    data = pq.read_table(sorted((root / "data").rglob("*.parquet"))).to_pylist()
    for dumped in (old, new):
        assert [it["index"] for it in dumped["items"]] == [r["index"] for r in data]
        assert [it["episode_index"] for it in dumped["items"]] == [r["episode_index"] for r in data]
        assert [it["frame_index"] for it in dumped["items"]] == [r["frame_index"] for r in data]
        assert [it["action"] for it in dumped["items"]] == [r["action"] for r in data]
        assert [it["observation.state"] for it in dumped["items"]] == [r["observation.state"] for r in data]
        assert {it["task"] for it in dumped["items"]} == {TASK}
    # frames: both versions decode the source's pixels exactly
    truth = _source_frames(rec, "observation.images.cam")
    assert [it["observation.images.cam"] for it in old["items"]] == truth
    assert [it["observation.images.cam"] for it in new["items"]] == truth
    assert old["items"] == new["items"]


def test_runner_drives_lerobot_044_train_and_resumes(store, lerobot_044, tmp_path):
    from conveyor.errors import ConveyorError
    from conveyor.settings import Settings
    from conveyor.training.attempt import run_attempt
    from conveyor.training.preflight import preflight
    from conveyor.training.request import TrainRequest

    _, root = store
    settings = Settings(store_root=root.parent, work_dir=tmp_path / "work", storage_url=f"file://{tmp_path / 'obj'}",
                        training={"lerobot_train": str(lerobot_044 / "bin/lerobot-train")})

    def request(steps: int, **options) -> TrainRequest:
        return TrainRequest(store="grasp", policy_type="act", device="cpu", batch_size=2, num_workers=0,
                            log_freq=1, steps=steps, save_freq=2, run_name="act-044",
                            options={**TINY_ACT, **options})

    # refusals are in 0.4.4's words, parsed by 0.4.4's own parser in its own interpreter
    with pytest.raises(ConveyorError) as e:
        preflight(request(3, **{"policy.not_a_field": 1}), settings, run_name="act-044")
    assert e.value.problem.startswith("the options do not parse as a lerobot 0.4.4 train config:")
    # a 0.6 option name is passed under 0.4.4's name
    plan = preflight(request(3, env_eval_freq=0), settings, run_name="act-044")
    assert plan.lerobot.version == "0.4.4" and not plan.lerobot.same_as_conveyor
    assert plan.lab_versions["python"].startswith("3.11.") and "--eval_freq=0" in plan.args
    assert plan.option_notes == ["`env_eval_freq` is `eval_freq` in lerobot 0.4.4: passed as `eval_freq`"]
    metrics: list = []
    first = run_attempt(plan, settings, log=lambda m: None, on_metrics=metrics.append)
    assert first.final_step == 3 and first.started_from == 0 and first.archived == ["000002", "000003"]
    assert [m.step for m in metrics] == [1, 2, 3] and all(m.loss > 0 and m.samples_per_s > 0 for m in metrics)
    assert Path(first.log_path).read_text().startswith(f"$ {lerobot_044 / 'bin/lerobot-train'} ")
    if plan.video_backend == "pyav":   # torchcodec cannot load here: marked absent in 0.4.4's processes too
        assert "--dataset.video_backend=pyav" in Path(first.log_path).read_text()
        assert "libtorchcodec" not in Path(first.log_path).read_text()
    # the same run name with more steps resumes with 0.4.4's --config_path/--resume
    metrics.clear()
    plan = preflight(request(4), settings, run_name="act-044")
    second = run_attempt(plan, settings, log=lambda m: None, on_metrics=metrics.append)
    assert second.started_from == 3 and second.final_step == 4 and [m.step for m in metrics] == [4]
    log = Path(second.log_path).read_text()
    assert "--resume=true" in log and "End of training" in log
    run_json = json.loads((Path(second.output_dir) / "run.json").read_text())
    assert run_json["versions"]["lerobot"] == "0.4.4" and run_json["versions"]["python"].startswith("3.11.")
    assert run_json["train_config"]["steps"] == 4 and "eval_freq" in run_json["train_config"]
    # evaluation loads the checkpoint with the lerobot that wrote it (run.json's lerobot_train), even where
    # the settings now name conveyor's own lerobot
    from conveyor.training.evaluate import evaluate

    report = evaluate("act-044", settings.model_copy(update={"training": Settings().training}), episodes=[2])
    assert report.lerobot == "0.4.4" and report.step == 4 and report.policy_type == "act"
    assert report.episodes == [2] and report.frames > 0 and len(report.joints) == 6
    assert all(j.mae > 0 and j.mse > 0 for j in report.joints) and "loaded by lerobot 0.4.4" in report.summary()
