"""One meaning for STORE (conveyor/stores.py): the ambiguous cases of the rule, and one rule for store names
that every command applies (issue 20 item 1, issue 21 item 1, issue 22 item 8)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.cli import main
from conveyor.errors import ConveyorError
from conveyor.stores import check_name, find_store, resolve_store
from conveyor.synthetic.recording import RecordingSpec, write_recording

SPEC = RecordingSpec(fps=10, cameras=())


def make_store(path: Path) -> Path:
    (path / ".conveyor").mkdir(parents=True)
    return path


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_name_that_is_also_a_folder_here_means_the_store(here):
    root = here / "stores"
    make_store(root / "lab")
    make_store(here / "lab")
    assert resolve_store("lab", root) == root / "lab"  # the name wins
    assert resolve_store("./lab", root) == Path("./lab")  # a path says "here"
    assert find_store("lab", root) == root / "lab"
    # no store of that name under store_root: the folder here (the command says what it is)
    (here / "rec").mkdir()
    assert resolve_store("rec", root) == Path("rec")
    # a command that creates a store creates it under store_root, whatever is here
    assert resolve_store("rec", root, new=True) == root / "rec"


def test_a_path_with_a_slash_is_a_path(here):
    root = here / "stores"
    make_store(root / "lab")
    assert resolve_store("sub/lab", root) == Path("sub/lab")  # not a name, even where store_root has `lab`
    assert resolve_store(str(root / "lab"), root) == root / "lab"
    assert find_store("sub/lab", root) is None


def test_an_unknown_name_lists_the_known_stores_and_the_nearest(here):
    root = here / "stores"
    for name in ("demo", "koch_grasp", "数据集"):
        make_store(root / name)
    with pytest.raises(ConveyorError) as e:
        resolve_store("demoo", root)
    assert e.value.problem == (f"no store named `demoo` under {root}; known stores: demo, koch_grasp, 数据集 "
                               "(nearest: demo)")
    assert find_store("demoo", root) is None
    with pytest.raises(ConveyorError, match="there are no stores there yet"):
        resolve_store("x", here / "empty")


@pytest.mark.parametrize("name", [".conveyor", "", "   ", "con:", "my store", "-x", ".hidden", "a/", "x" * 101,
                                  "tab\there"])
def test_names_that_are_refused(here, name):
    with pytest.raises(ConveyorError) as e:
        resolve_store(name, here / "stores", new=True) if "/" not in name else check_name(name)
    assert "not a valid store name" in e.value.problem and "letters (any script)" in e.value.problem
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["数据集", "koch_grasp", "v1.2", "Lab-2"])
def test_names_that_are_allowed(name):
    assert check_name(name) == name


def test_store_root_itself_and_bookkeeping_are_never_a_store(here):
    root = here / "stores"
    make_store(root / "lab")
    for spec in (str(root), "stores/", str(root / "lab/.conveyor"), "./stores/lab/.conveyor/commits"):
        with pytest.raises(ConveyorError):
            resolve_store(spec, root, new=True)


CLI = [sys.executable, "-m", "conveyor.cli"]


def test_every_command_takes_the_same_names(tmp_path):
    """ingest, backup, publish, scrub and show accept a Chinese name, and refuse `my store` in one line."""
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'store_root = "stores"\nwork_dir = "work"\nstorage_url = "file://{tmp_path / "repo"}"\n',
                   encoding="utf-8")
    rec = write_recording(tmp_path / "rec", episodes=2, lengths=3, spec=SPEC)

    def run(*args):
        p = subprocess.run(CLI + ["--config", str(cfg), *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
        return p.returncode, p.stdout, p.stderr

    for cmd in (["ingest", str(rec)], ["backup"], ["publish"], ["scrub"], ["show"]):
        code, out, err = run(*cmd, "数据集")
        assert code == 0, (cmd, out, err)
        code, out, err = run(*cmd, "my store")
        assert code == 1 and len(err.strip().splitlines()) == 1, (cmd, out, err)
        assert "not a valid store name (it contains ' '): use letters (any script)" in err, err
    assert not (tmp_path / "stores/my store").exists()
    code, out, err = run("show", "数据级")
    assert code == 1 and "known stores: 数据集 (nearest: 数据集)" in err, err
    code, out, err = run("stores", "--json")
    assert code == 0 and [s["name"] for s in json.loads(out)] == ["数据集"], out


def test_backup_verify_and_prune_are_subcommands_so_a_store_named_verify_backs_up(tmp_path, capsys):
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'store_root = "stores"\nwork_dir = "work"\nstorage_url = "file://{tmp_path / "repo"}"\n',
                   encoding="utf-8")
    rec = write_recording(tmp_path / "rec", episodes=1, lengths=3, spec=SPEC)
    c = ["--config", str(cfg)]
    assert main(c + ["ingest", str(rec), "verify"]) == 0 and main(c + ["ingest", str(rec), "lab"]) == 0
    capsys.readouterr()
    assert main(c + ["backup", "store", "verify"]) == 0  # the store named `verify`, by its name
    assert main(c + ["backup", "lab"]) == 0  # the everyday form: `store` is the default action
    assert "@lab/" in capsys.readouterr().out
    assert main(c + ["backup", "verify", "--full"]) == 0  # the action: both targets' snapshots re-read
    out = capsys.readouterr().out
    assert "@verify/" in out and "@lab/" in out and out.count(": ok: ") == 2
    assert main(c + ["backup", "prune", "--keep-daily", "1"]) == 0
    for wrong in (["backup", "verify", "--keep-daily", "1"], ["backup", "lab", "--full"], ["backup"]):
        with pytest.raises(SystemExit) as e:  # each action takes only its own options: a usage error
            main(c + wrong)
        assert e.value.code == 2


def test_the_training_request_names_the_known_stores_too(tmp_path):
    from conveyor.datasets.resolve import resolve_dataset
    from conveyor.settings import Settings

    make_store(tmp_path / "stores" / "koch_grasp")
    for url in (f"file://{tmp_path / 'repo'}", ""):  # published nowhere; no storage_url at all
        settings = Settings(store_root=tmp_path / "stores", storage_url=url, cache_dir=tmp_path / "cache")
        with pytest.raises(ConveyorError) as e:
            resolve_dataset("koch_grasq", None, settings, run="r", run_dir=tmp_path / "run", archive_url=None)
        assert "(known stores: koch_grasp (nearest: koch_grasp))" in e.value.problem, e.value.problem
