"""Settings: file + CONVEYOR_* env, relative paths, clear errors naming the key, `conveyor config show`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.errors import ConveyorError
from conveyor.settings import load_settings

TOML = """
store_root = "data/stores"
storage_url = "file://data/objects"

[[sources]]
name = "koch_grasp"
path = "recordings/koch_grasp"
task = "抓取方块"

[s3]
endpoint_url = "http://127.0.0.1:9000"
secret_access_key = "very-secret-value"

[schedules]
timezone = "Asia/Shanghai"

[training]
policy = "every_n"
every_n = 10
parameters = { dataset = "{store_path}", steps = 5 }
"""


def _conveyor(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conveyor.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)


def test_file_values_and_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    cfg = tmp_path / "cfg" / "conveyor.toml"
    cfg.parent.mkdir()
    cfg.write_text(TOML, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # not the config folder: paths must still resolve against cfg/
    s = load_settings(cfg)
    assert s.config_path == cfg.resolve()
    assert s.store_root == cfg.parent / "data" / "stores"
    assert s.store_path("koch_grasp") == cfg.parent / "data" / "stores" / "koch_grasp"
    assert s.storage_url == f"file://{cfg.parent / 'data' / 'objects'}"
    src = s.source("koch_grasp")
    assert src.path == cfg.parent / "recordings" / "koch_grasp" and src.task == "抓取方块"
    assert s.schedules.timezone == "Asia/Shanghai" and s.training.every_n == 10
    assert s.prefect.home == cfg.parent / ".prefect"
    with pytest.raises(ConveyorError, match="no source named 'nope'"):
        s.source("nope")


def test_env_beats_file_and_config_env_var(tmp_path, monkeypatch):
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(TOML, encoding="utf-8")
    monkeypatch.setenv("CONVEYOR_CONFIG", str(cfg))
    monkeypatch.setenv("CONVEYOR_WATCH__SETTLE_SECONDS", "2.5")
    monkeypatch.setenv("CONVEYOR_TRAINING__POLICY", "nightly")
    s = load_settings()
    assert s.config_path == cfg.resolve()
    assert s.watch.settle_seconds == 2.5 and s.training.policy == "nightly"
    assert s.training.every_n == 10  # untouched keys of the same table still come from the file


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONVEYOR_CONFIG", raising=False)
    s = load_settings()
    assert s.config_path is None and s.sources == []
    assert s.store_root == tmp_path / "data" / "stores"
    assert s.schedules.nightly_cron == "0 2 * * *" and s.training.policy == "off"


@pytest.mark.parametrize("text, key", [
    ('[prefect]\nport = "abc"\n', "prefect.port"),
    ('[[sources]]\nname = "bad name!"\npath = "x"\n', "sources.0.name"),
    ('[training]\npolicy = "sometimes"\n', "training.policy"),
    ('unknown_key = 1\n', "unknown_key"),
    ('[[sources]]\nname = "a"\npath = "x"\n[[sources]]\nname = "a"\npath = "y"\n', "sources"),
])
def test_invalid_file_names_the_key(tmp_path, text, key):
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(text, encoding="utf-8")
    with pytest.raises(ConveyorError) as e:
        load_settings(cfg)
    assert str(cfg) in str(e.value) and f"`{key}`" in str(e.value)


def test_missing_explicit_config_and_broken_toml(tmp_path):
    with pytest.raises(ConveyorError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("store_root = \n", encoding="utf-8")
    with pytest.raises(ConveyorError, match="not valid TOML"):
        load_settings(bad)


def test_config_show_masks_secrets_and_errors_are_one_line(tmp_path):
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(TOML, encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "CONVEYOR_S3__ACCESS_KEY_ID": "AKIA-from-env"}
    p = _conveyor("--config", str(cfg), "config", "show", env=env)
    assert p.returncode == 0, p.stderr
    assert "very-secret-value" not in p.stdout and "AKIA-from-env" not in p.stdout
    body = json.loads(p.stdout.split("\n", 1)[1])
    assert body["s3"]["secret_access_key"] == "**********" and body["s3"]["access_key_id"] == "**********"
    assert body["sources"][0]["task"] == "抓取方块"
    assert body["sources"][0]["path"] == str(tmp_path / "recordings" / "koch_grasp")

    cfg.write_text('[watch]\nsettle_seconds = -1\n', encoding="utf-8")
    p = _conveyor("--config", str(cfg), "config", "show", env=env)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and "`watch.settle_seconds`" in p.stderr and str(cfg) in p.stderr


def test_up_gives_flows_the_paths_resolved_where_it_was_started(tmp_path, monkeypatch):
    """Worker-run flows start in the checkout; without a config file they must still see the store_root,
    work_dir and storage_url that `conveyor up` resolved in the folder it was started from."""
    from conveyor.service.supervisor import PROJECT_DIR, Supervisor

    monkeypatch.chdir(tmp_path)  # no conveyor.toml here: defaults resolve against this folder
    monkeypatch.delenv("CONVEYOR_CONFIG", raising=False)
    settings = load_settings()
    env = Supervisor(settings)._child_env()
    shown = subprocess.run([sys.executable, "-m", "conveyor.cli", "config", "show"], cwd=PROJECT_DIR, env=env,
                           capture_output=True, text=True, check=True).stdout
    seen = json.loads(shown.split("\n", 1)[1])
    assert seen["store_root"] == str(tmp_path / "data" / "stores")
    assert seen["work_dir"] == str(tmp_path / "data" / "work")
    assert seen["storage_url"] == f"file://{tmp_path / 'data' / 'objects'}"


@pytest.mark.parametrize("text, key, near", [
    ('[backup]\nkeep_daly = 3\n', "backup.keep_daly", "backup.keep_daily"),
    ('[s3]\nendpoint_ur = "http://x"\n', "s3.endpoint_ur", "s3.endpoint_url"),
    ('[training]\npolcy = "off"\n', "training.polcy", "training.policy"),
    ('[scrub]\nrepiar = true\n', "scrub.repiar", "scrub.repair"),
    ('[prefect]\nmachin = "rig-a"\n', "prefect.machin", "prefect.machine"),
    ('[transfer]\nmax_concurency = 4\n', "transfer.max_concurency", "transfer.max_concurrency"),
    ('[datasets]\nkeep_dys = 4\n', "datasets.keep_dys", "datasets.keep_days"),
    ('[schedules]\ntimezon = "UTC"\n', "schedules.timezon", "schedules.timezone"),
    ('[watch]\nsettle_second = 2\n', "watch.settle_second", "watch.settle_seconds"),
    ('[[sources]]\nname = "a"\npath = "x"\ntsk = "y"\n', "sources.0.tsk", "sources.0.task"),
    ('stor_root = "x"\n', "stor_root", "store_root"),
])
def test_a_typo_inside_any_table_is_refused_naming_the_nearest_key(tmp_path, text, key, near):
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(text, encoding="utf-8")
    with pytest.raises(ConveyorError) as e:
        load_settings(cfg)
    assert str(cfg) in str(e.value) and f"`{key}`" in str(e.value) and f"did you mean `{near}`?" in str(e.value)
    if key == "backup.keep_daly":  # the command line: exit 1, one line
        p = _conveyor("--config", str(cfg), "config", "show", env={"PATH": "/usr/bin:/bin"})
        assert p.returncode == 1 and p.stdout == "" and p.stderr.strip().count("\n") == 0, p.stderr
        assert f"did you mean `{near}`?" in p.stderr


def test_a_typo_in_a_nested_environment_variable_is_refused_too(tmp_path, monkeypatch):
    """CONVEYOR_<TABLE>__<KEY> goes through the same model; a top-level CONVEYOR_* name is not checked (the prefix
    is shared with CONVEYOR_CONFIG, CONVEYOR_CRASH_AT and the like)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONVEYOR_CONFIG", raising=False)
    monkeypatch.setenv("CONVEYOR_BACKUP__KEEP_DALY", "3")
    with pytest.raises(ConveyorError) as e:
        load_settings()
    assert "`backup.keep_daly` (from $CONVEYOR_BACKUP__KEEP_DALY)" in str(e.value)
    assert "did you mean `backup.keep_daily`?" in str(e.value)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[watch]\nzzz = 1\n', encoding="utf-8")
    monkeypatch.delenv("CONVEYOR_BACKUP__KEEP_DALY")
    with pytest.raises(ConveyorError, match="valid keys here: settle_seconds, debounce_seconds, rescan_seconds"):
        load_settings(cfg)
