"""What a lab sees: `conveyor stores` / `show`, the UI artifacts of ingest and training, help and errors,
and the newcomer bugs of issue 10 (each test names its bug)."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conveyor.cli import COMMANDS, _command, build_parser, main
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter, write_recording

ROOT = Path(__file__).resolve().parent.parent
SPEC = RecordingSpec(fps=10, cameras=(CameraSpec("observation.images.cam", codec="h264"),))
CLI = [sys.executable, "-c", "import sys; from conveyor.cli import main; sys.exit(main())"]


def write_config(tmp: Path, name: str = "lab") -> Path:
    cfg = tmp / "conveyor.toml"
    cfg.write_text(f'store_root = "stores"\nwork_dir = "work"\n[[sources]]\nname = "{name}"\npath = "rec"\n'
                   f'task = "pick the cube"\n', encoding="utf-8")
    return cfg


def corrupt_episode(w: RecordingWriter, ep: int, length: int = 6) -> tuple[Path, bytes]:
    """A finished episode with a truncated parquet; returns the file and its good bytes."""
    files = w.write_episode(ep, length, "pick the cube", finish=False)
    good = files.parquet.read_bytes()
    files.parquet.write_bytes(good[: len(good) // 2])
    w.finish_episode(ep)
    return files.parquet, good


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("conveyor: error: "), err
    return lines[0]


# -- bug 1: the fresh-start command pastes into a shell ---------------------------------------------------

def test_fresh_start_command_pastes_into_a_shell():
    from tasks.views import fresh_start_command

    args = ["--dataset.root=/data/my stores/koch", "--policy.resize_imgs_with_padding=[64,64]",
            "--job_name=it's mine", "--policy.type=act", "--output_dir=/tmp/x$HOME"]
    text = fresh_start_command("printf '%s\\n'", args)
    lines = text.splitlines()
    assert len(lines) == len(args) + 1
    assert all(ln.endswith(" \\") for ln in lines[:-1]) and not lines[-1].endswith("\\")
    out = subprocess.run(["bash", "-c", text], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == args


# -- bug 2: validate on a v2.1 recording says what it is --------------------------------------------------

def test_validate_on_a_v21_recording_says_it_is_one(tmp_path, capsys):
    rec = write_recording(tmp_path / "rec", episodes=1, lengths=4, spec=SPEC)
    assert main(["validate", str(rec)]) == 1
    line = one_error_line(capsys)
    assert "v2.1 recording" in line and "conveyor convert" in line and "conveyor ingest" in line
    assert "v3.0" not in line


# -- bug 3: descriptions the UI renders as markdown have no <placeholders> --------------------------------

def test_ui_descriptions_have_no_html_like_placeholders():
    from conveyor.training.request import TrainRequest
    from flows import backup, ingest, nightly, train, watch

    texts = [d.get("description", "") for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]]
    texts += [f.__doc__ or "" for f in (ingest.ingest, watch.watch, nightly.nightly, train.train, train.evaluate,
                                        backup.backup)]
    texts += [f.description or "" for f in TrainRequest.model_fields.values()]
    tag = re.compile(r"<[A-Za-z_][^>\s]*>")
    assert not [t for t in texts if tag.search(t)], [tag.findall(t) for t in texts if tag.search(t)]
    assert "runs/RUN_NAME/" in " ".join(texts)


def test_train_form_labels_and_known_stores(tmp_path, monkeypatch):
    from conveyor.training.request import TrainRequest

    cfg = write_config(tmp_path, "koch_grasp")
    (tmp_path / "stores/older/.conveyor").mkdir(parents=True)
    monkeypatch.setenv("CONVEYOR_CONFIG", str(cfg))
    form = TrainRequest.model_json_schema()["properties"]
    assert form["store"]["description"].endswith("Known stores: koch_grasp, older.")
    assert form["vlm_model_name"]["title"] == "VLM model name"
    for name in ("policy_path", "vlm_model_name", "run_name", "output_dir", "archive_url", "dataset_version",
                 "batch_size"):
        assert "anyOf" not in form[name] and form[name]["type"] in ("string", "integer"), name  # no type toggle
    assert TrainRequest(store="s", vlm_model_name="", batch_size="", run_name="").vlm_model_name is None
    notes = [n for n, f in form.items() if re.search(r"`<|settings\.|policy_path|UI", f.get("description", ""))]
    assert not notes, notes  # written for the person filling in the form


# -- bug 5: every command that takes a store takes its name -----------------------------------------------

def test_store_commands_take_a_name_or_a_path(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path)
    write_recording(tmp_path / "rec", episodes=2, lengths=5, spec=SPEC)
    monkeypatch.chdir(tmp_path)  # ./rec is the recording: the name `rec` still means the store
    c = ["--config", str(cfg)]
    assert main(c + ["ingest", "rec", "rec"]) == 0
    assert (tmp_path / "stores/rec/.conveyor").is_dir() and not (tmp_path / "rec/.conveyor").exists()
    assert main(c + ["validate", "rec"]) == 0
    assert main(c + ["compact", "rec"]) == 0
    assert main(c + ["show", "rec", "--json"]) == 0
    assert main(c + ["validate", str(tmp_path / "stores/rec")]) == 0
    assert main(c + ["convert", "rec", "copy"]) == 0 and (tmp_path / "stores/copy/.conveyor").is_dir()
    capsys.readouterr()
    assert main(c + ["validate", "nope"]) == 1
    assert "no store named `nope` under " in one_error_line(capsys)  # and the known stores (tests/test_stores.py)
    write_recording(tmp_path / "raw", episodes=1, lengths=3, spec=SPEC)
    assert main(c + ["validate", "raw"]) == 1  # no store of that name: the folder here, said for what it is
    assert "v2.1 recording" in one_error_line(capsys)


# -- bug 6: declared camera streams must match the files ----------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    ({"shape": [96, 128, 3], "info.video.height": 96, "info.video.width": 128}, "height 96 declared, 48 in the file"),
    ({"info.video.fps": 15.0}, "fps 15 declared, 10 in the file"),
    ({"info.video.codec": "hevc"}, "codec hevc declared, h264 in the file"),
    ({"info.video.pix_fmt": "yuv444p"}, "pix_fmt yuv444p declared, yuv420p in the file"),
])
def test_declared_camera_stream_the_files_lack_is_refused(tmp_path, capsys, change, needle):
    rec = write_recording(tmp_path / "rec", episodes=2, lengths=4, spec=SPEC)
    info_path = rec / "meta/info.json"
    info = json.loads(info_path.read_text())
    cam = info["features"]["observation.images.cam"]
    for key, value in change.items():
        if key.startswith("info."):
            cam["info"][key[5:]] = value
        else:
            cam[key] = value
    info_path.write_text(json.dumps(info, indent=4))
    assert main(["convert", str(rec), str(tmp_path / "out")]) == 1
    line = one_error_line(capsys)
    assert "camera observation.images.cam" in line and needle in line and str(info_path) in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_declared_cameras_are_checked_on_the_first_readable_episode(tmp_path, capsys):
    rec = write_recording(tmp_path / "rec", episodes=2, lengths=4, spec=SPEC)
    broken = rec / "videos/chunk-000/observation.images.cam/episode_000000.mp4"
    broken.write_bytes(b"not a video")
    assert main(["convert", str(rec), str(tmp_path / "ok")]) == 1  # episode 0 quarantined, episode 1 lands
    assert (tmp_path / "ok/.conveyor").is_dir() and "episode_000000.mp4" in capsys.readouterr().err
    info_path = rec / "meta/info.json"
    info = json.loads(info_path.read_text())
    info["features"]["observation.images.cam"]["info"]["video.fps"] = 30.0
    info_path.write_text(json.dumps(info, indent=4))
    assert main(["convert", str(rec), str(tmp_path / "bad")]) == 1
    assert "fps 30 declared, 10 in the file (videos/chunk-000/observation.images.cam/episode_000001.mp4)" \
        in one_error_line(capsys)


def test_av1_declared_and_decoded_by_another_decoder_is_the_same_codec(tmp_path, capsys):
    from conveyor.cameras import same_codec, stream_header
    from conveyor.source import V21Source

    rec = write_recording(tmp_path / "rec", episodes=1, lengths=4,
                          spec=RecordingSpec(fps=10, cameras=(CameraSpec("observation.images.cam"),)))
    src = V21Source.open(rec)
    checked = src.check_declared_cameras(src.scan()[0])  # av1 declared, libdav1d decodes: no complaint
    assert checked is not None and checked.index == 0, "the check ran on an episode whose video opened"
    decoder = stream_header(checked.videos["observation.images.cam"])["codec"]
    assert src.features["observation.images.cam"]["info"]["video.codec"] == "av1"
    assert same_codec("av1", decoder) and not same_codec("h264", decoder)
    # the same check refuses a codec the file does not have
    info_path = rec / "meta/info.json"
    info = json.loads(info_path.read_text())
    info["features"]["observation.images.cam"]["info"]["video.codec"] = "h264"
    info_path.write_text(json.dumps(info, indent=4))
    assert main(["convert", str(rec), str(tmp_path / "bad")]) == 1
    assert f"codec h264 declared, {decoder} in the file" in one_error_line(capsys)


# -- see the store: conveyor stores / show ------------------------------------------------------------------

def test_stores_and_show_describe_the_dataset(tmp_path, capsys):
    cfg = write_config(tmp_path)
    w = RecordingWriter(tmp_path / "rec", SPEC)
    w.write_episode(0, 10, "pick the cube")
    w.write_episode(1, 20, "stack 方块")
    c = ["--config", str(cfg)]
    assert main(c + ["ingest", str(tmp_path / "rec"), "lab"]) == 0
    w.write_episode(2, 30, "pick the cube")
    broken, good = corrupt_episode(w, 3)
    assert main(c + ["ingest", str(tmp_path / "rec"), "lab"]) == 1  # a quarantined episode fails the command
    capsys.readouterr()

    assert main(c + ["stores", "--json"]) == 0
    [s] = json.loads(capsys.readouterr().out)
    assert (s["name"], s["episodes"], s["frames"]) == ("lab", 3, 60)
    assert s["version"].startswith("c2-") and s["size_bytes"] > 1000 and s["last_commit"]
    assert abs(s["hours"] - 60 / 10 / 3600) < 1e-9

    assert main(c + ["show", "lab", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {f["name"]: f["shape"] for f in d["features"]}["observation.images.cam"] == [48, 64, 3]
    assert d["cameras"] == [{"key": "observation.images.cam", "width": 64, "height": 48, "codec": "h264",
                             "pix_fmt": "yuv420p", "fps": 10.0}]
    assert {t["task"]: t["episodes"] for t in d["tasks"]} == {"pick the cube": 2, "stack 方块": 1}
    assert d["lengths"]["frames"] == [10, 20, 30] and d["lengths"]["median"] == 20
    assert [(v["commit"], v["episodes_added"], v["frames_added"]) for v in d["versions"]] == [(1, 2, 30), (2, 1, 30)]
    [q] = d["quarantined"]
    assert q["source_episode_index"] == 3 and "parquet" in q["reason"]

    assert main(c + ["show", "lab"]) == 0  # the tables a person reads
    out = capsys.readouterr().out
    assert "observation.images.cam" in out and "64x48" in out and "stack 方块" in out and "+1 ep" in out
    assert "corrupt parquet" in out

    # fixing the episode and ingesting again clears the quarantine
    broken.write_bytes(good)
    assert main(c + ["ingest", str(tmp_path / "rec"), "lab"]) == 0
    capsys.readouterr()
    assert main(c + ["show", "lab", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quarantined"] == []


def test_stores_on_an_empty_root_says_where_it_looked(tmp_path, capsys):
    assert main(["--config", str(write_config(tmp_path)), "stores"]) == 0
    assert str(tmp_path / "stores") in capsys.readouterr().out


def test_store_picture_is_a_png(tmp_path):
    from conveyor.charts import store_png
    from conveyor.ingest import convert
    from conveyor.inventory import describe

    convert(write_recording(tmp_path / "rec", episodes=3, lengths=[5, 8, 13], spec=SPEC), tmp_path / "s")
    png = store_png(describe(tmp_path / "s"))
    assert png.startswith(b"\x89PNG") and len(png) > 5000


# -- help ---------------------------------------------------------------------------------------------------

def _actions(p: argparse.ArgumentParser, path=()):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _actions(sub, path + (name,))
        elif not isinstance(a, argparse._HelpAction):
            yield " ".join(path), a, p


def test_every_option_has_help_and_shows_its_default():
    missing, hidden = [], []
    for cmd, a, p in _actions(build_parser()):
        if not a.help:
            missing.append(f"{cmd} {a.dest}")
        text = p.format_help()
        if a.option_strings and a.default not in (None, False, [], argparse.SUPPRESS) \
                and "default" not in a.help and f"(default: {a.default})" not in " ".join(text.split()):
            hidden.append(f"{cmd} {a.option_strings[0]}")
    assert not missing and not hidden, (missing, hidden)
    top = build_parser().format_help()
    assert "conveyor show" in top and "store name" in top.lower()


def test_a_command_parses_with_only_its_module_and_the_same_as_with_all():
    """`conveyor ingest ...` builds only conveyor.cli.store's parser: the command map must name, for every
    command, the module that registers it, and parsing with that one module must give what the whole
    parser gives."""
    whole = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert sorted(COMMANDS) == sorted(whole)
    for command in COMMANDS:
        alone = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
        assert command in alone.choices, (command, COMMANDS[command])
    argv = ["--config", "c.toml", "ingest", "SRC", "STORE"]
    assert _command(argv) == "ingest" and _command(["--help"]) is None and _command(["nope"]) == "nope"
    assert vars(build_parser("ingest").parse_args(argv)) == vars(build_parser().parse_args(argv))
    r = subprocess.run(CLI + ["nope"], capture_output=True, text=True)  # an unknown word: the whole list
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr and "publish" in r.stderr, r.stderr
    r = subprocess.run(CLI + ["ingest", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: conveyor ingest" in r.stdout, r.stderr


# -- errors: `conveyor train` fails in one line and links its run --------------------------------------------

@pytest.fixture
def prefect_api(prefect_server) -> str:
    import prefect.context

    prefect.context.refresh_global_settings_context()
    return prefect_server.api_url


def test_train_error_is_one_line(prefect_api, tmp_path):
    cfg = write_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": prefect_api}
    r = subprocess.run(CLI + ["--config", str(cfg), "train", "--store", "nope", "--policy-type", "act",
                              "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower() or "Traceback" in ln]
    assert errors == [errors[0]] and errors[0].startswith("conveyor: error: nope: no store named"), r.stderr
    assert "temporary server" not in r.stderr
    # a run preflight refuses prints its one line and nothing else (the link comes once preflight passed:
    # tests/test_training.py::test_cli_terminal_shows_the_plan_progress_and_link_only checks it)
    assert r.stdout == "", r.stdout


# -- the ingest run's artifacts and name ------------------------------------------------------------------------

def _api(url: str, method: str, path: str, body: dict | None = None):
    import httpx

    r = httpx.request(method, url + path, json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def test_ingest_run_reads_as_history_with_validation_store_and_progress_artifacts(prefect_api, tmp_path):
    from flows.ingest import ingest

    name = "lab-ui"
    cfg = write_config(tmp_path, name)
    w = RecordingWriter(tmp_path / "rec", SPEC)
    for ep in range(3):
        w.write_episode(ep, 8 + ep)
    corrupt_episode(w, 3)
    res = ingest(source=name, config=str(cfg), deep=False)
    run = _api(prefect_api, "GET", f"/flow_runs/{res['run_id']}")
    assert run["name"] == f"{name} +3 ep -> c1, 1 quarantined"
    arts = {a["key"]: a for a in _api(prefect_api, "POST", "/artifacts/filter",
                                      {"artifacts": {"flow_run_id": {"any_": [res["run_id"]]}}})}
    progress = arts[f"ingest-progress-{name}"]
    assert float(progress["data"]) == 100.0 and progress["description"].startswith("done: 3 episode(s) committed")
    check = arts[f"validation-{name}"]
    assert "PASSED" in check["data"] and "| fast | pass |" in check["data"]
    assert re.search(r"\| fast \| pass \| \d+ \| 3 \| 27 \| 9 \|", check["data"]), check["data"]
    overview = arts[f"store-{name}"]
    assert "data:image/png;base64," in overview["description"] and "3 episodes" in overview["data"]
    assert "corrupt parquet" in overview["data"]

    # nothing new: the name says so, the progress still ends at 100 %
    res = ingest(source=name, config=str(cfg), deep=False)
    assert _api(prefect_api, "GET", f"/flow_runs/{res['run_id']}")["name"] == f"{name} nothing new (c1), 1 quarantined"


@pytest.mark.lerobot
def test_watch_deep_check_verdict_lands_on_the_ingest_run(prefect_api, tmp_path):
    from prefect import flow, get_run_logger

    from conveyor.ingest import convert
    from flows.watch import _DeepChecks

    from conveyor.ingest import ingest

    store = tmp_path / "s"
    convert(write_recording(tmp_path / "rec", episodes=2, lengths=5, spec=SPEC), store)   # the run's commit c1

    @flow(name="lab-ingest-stand-in")
    def ingest_run() -> str:
        from prefect.runtime import flow_run
        return flow_run.get_id()

    @flow(name="lab-watch-stand-in")
    def watch_run(target: str) -> int:
        checks = _DeepChecks(get_run_logger())  # the watch flow's own deferred deep check
        checks.add("lab-deep", store, tmp_path / "rec", [0, 1], target, 1)
        checks.drain()
        return checks.failed

    target = ingest_run()
    RecordingWriter(tmp_path / "rec", SPEC).write_episode(2, 5)
    ingest(tmp_path / "rec", store)                          # the store moves on to c2 before the check runs
    assert watch_run(target) == 0
    [art] = _api(prefect_api, "POST", "/artifacts/filter",
                 {"artifacts": {"flow_run_id": {"any_": [target]}, "key": {"any_": ["validation-lab-deep"]}}})
    assert "PASSED" in art["data"] and "| deep | pass |" in art["data"] and "watch flow" in art["data"]
    assert art["description"] == "lab-deep c1: deep pass", "under the commit its ingest run made"
    assert "commit 1: PASSED" in art["data"] and "the store was at c2 when checked" in art["data"]
    # the watch flow's deep check is lerobot's loader alone (its fast check ran in the ingest run): 3 sampled
    # items of each 5-frame episode, one camera
    assert re.search(r"\| deep \| pass \| \d+ \| 2 \| 6 \| 6 \|", art["data"]), art["data"]


def test_config_dump_becomes_one_artifact(prefect_api):
    from pprint import pformat

    from prefect import flow

    from tasks.views import ConfigDump

    import enum

    class Mode(enum.Enum):
        MEAN_STD = "MEAN_STD"

    cfg = {"batch_size": 8, "policy": {"type": "act", "dim_model": 512, "optimizer_lr": 1e-05,
                                       "normalization_mapping": {"VISUAL": Mode.MEAN_STD}},
           "dataset": {"repo_id": "lab/koch", "root": "/data/stores/koch", "video_backend": "pyav",
                       "image_transforms": {"enable": False, "max_num_transforms": 3}}, "job_name": "act",
           "steps": 5}
    dump = pformat(cfg, width=40).splitlines()
    assert len(dump) > 5
    lines = ["INFO 2026-11-25 21:00:00 ils.py:100 starting", f"INFO 2026-11-25 21:00:01 ain.py:272 {dump[0]}",
             *dump[1:], "INFO 2026-11-25 21:00:02 ain.py:300 Output dir: /x",
             "WARNING 2026-11-25 21:00:03 ain.py:301 {'not': 'closed'", "INFO 2026-11-25 21:00:04 ain.py:9 end"]
    seen: list[str] = []

    @flow(name="lab-config-dump")
    def feed() -> str:
        from prefect.runtime import flow_run

        dump_filter = ConfigDump("cfg-run", seen.append)
        for ln in lines:
            dump_filter(ln)
        return flow_run.get_id()

    run_id = feed()
    assert seen[0].endswith("starting") and "see the train-config artifact" in seen[1]
    assert seen[2].endswith("Output dir: /x") and seen[-1].endswith("end") and "{'not': 'closed'" in seen[-2]
    [art] = _api(prefect_api, "POST", "/artifacts/filter",
                 {"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": ["train-config-cfg-run"]}}})
    rows = {r["option"]: r["value"] for r in json.loads(art["data"])}
    assert rows["policy.dim_model"] == "512" and rows["dataset.image_transforms.max_num_transforms"] == "3"
    assert rows["dataset.root"] == "'/data/stores/koch'" and len(rows) == 12
    assert rows["policy.normalization_mapping.VISUAL"] == "'MEAN_STD'"  # lerobot prints enum members


def test_one_markdown_escaper_for_every_artifact():
    """Quarantine reasons, validation failures, review sheets: one escaper, which keeps `<run>` and `|` text."""
    import conveyor.review
    import tasks.artifacts
    import tasks.views
    from conveyor.reports import md_text

    assert tasks.artifacts.md_text is tasks.views.md_text is conveyor.review.md_text is md_text
    assert md_text("bad <run> | x\ny") == "bad &lt;run&gt; \\| x y"
