"""Session-wide real services: one Prefect server (SQLite, temp PREFECT_HOME) and one S3 server (moto).

Both are started lazily, once per test session, on free 127.0.0.1 ports, and stopped at the end.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conveyor.service.prefect_server import prefect_env, start_prefect_server
from conveyor.processes import free_port

# Test tiers (pyproject.toml's markers): `prefect` is applied here to every test that uses a Prefect server
# fixture, directly or through another fixture, and `postgres` to every test on the PostgreSQL one; the other
# markers are set by hand where a test needs lerobot, Chromium or strace.
SERVER_MARKS = {"prefect_server": ("prefect",), "postgres_prefect_server": ("prefect", "postgres")}

# Under CONVEYOR_CI_NO_SKIP=1 (set by .ci/run) a skip is a failure: CI installs what the tests need, so a skip
# there means it did not. Only these reasons are legitimate on a CI machine (not something CI installs).
CI_LEGITIMATE_SKIPS = ("this machine has CUDA", "cannot mount a tmpfs here", "cannot bind-mount here")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marks in SERVER_MARKS.items():
            if fixture in item.fixturenames:  # the closure: fixtures that fixtures use count too
                for mark in marks:
                    item.add_marker(mark)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("CONVEYOR_CI_NO_SKIP") == "1" and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not reason.startswith(CI_LEGITIMATE_SKIPS):
            rep.outcome = "failed"
            rep.longrepr = f"skipped under CONVEYOR_CI_NO_SKIP=1, CI should have provided it: {reason}"


pytest_plugins = ["pytester"]  # tests/test_tiers.py runs the hooks below on small test files

# nothing in the test session may reach a hub
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SVT_LOG="1",
                  PREFECT_SERVER_ANALYTICS_ENABLED="false")


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session", autouse=True)
def _hf_home(tmp_path_factory):
    """Keep HF datasets' Arrow cache out of the user's home."""
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_LEROBOT_HOME"] = str(home / "lerobot")
    yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server for the whole session; PREFECT_API_URL points at it from here on."""
    home = tmp_path_factory.mktemp("prefect_home")
    server = start_prefect_server(home, port=free_port())
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL")}
    os.environ.update(prefect_env(home, server.api_url, base={}))
    import prefect.context

    prefect.context.refresh_global_settings_context()  # prefect snapshots the environment at import
    yield server
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    # flush in-process log/event shippers while the server is still up (else they retry for ~70 s)
    APILogWorker.drain_all(timeout=20)
    EventsWorker.drain_all(timeout=20)
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server on 127.0.0.1 (SigV4, multipart, checksums), with test credentials."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "conveyor-test-key")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "conveyor-test-secret-do-not-log")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def postgres_prefect_server(tmp_path_factory):
    """A second, shared-lab-style Prefect server: on a throwaway PostgreSQL 15 cluster (tests/pg.py).

    Started only by the tests that ask for it; it does not touch PREFECT_API_URL of this process (the
    `prefect_server` fixture owns that)."""
    import pg

    why = pg.available()
    if why:
        pytest.skip(why)
    cluster = pg.start_cluster()
    try:
        server = start_prefect_server(tmp_path_factory.mktemp("prefect_pg_home"), port=free_port(),
                                      database_url=cluster.url())
    except BaseException:
        cluster.stop()
        raise
    server.postgres = cluster
    yield server
    server.stop()
    cluster.stop()
