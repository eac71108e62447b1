"""The test tiers of tests/conftest.py: the `prefect`/`postgres` markers follow the server fixtures (also through
another fixture), and under CONVEYOR_CI_NO_SKIP=1 a skip CI should have fixed is a failure."""
from __future__ import annotations

from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py").read_text(encoding="utf-8")

TESTS = '''
import pytest

@pytest.fixture
def api(prefect_server):
    return prefect_server

def test_direct(prefect_server): pass
def test_through_a_fixture(api): pass
def test_on_postgres(postgres_prefect_server): pass
def test_pure(): pass
'''


def test_server_fixtures_mark_their_tests(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_marks=TESTS)
    fast = pytester.runpytest("--collect-only", "-q", "-m", "not prefect")
    assert [ln for ln in fast.outlines if "::" in ln] == ["test_marks.py::test_pure"]
    pg = pytester.runpytest("--collect-only", "-q", "-m", "postgres")
    assert [ln for ln in pg.outlines if "::" in ln] == ["test_marks.py::test_on_postgres"]


def test_ci_turns_a_skip_it_should_have_fixed_into_a_failure(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_skips='''
import pytest

def test_missing_tool(): pytest.skip("needs Debian's chromium")

@pytest.mark.skipif(True, reason="strace is not installed")
def test_skipif(): pass

def test_legitimate(): pytest.skip("this machine has CUDA")
''')
    monkeypatch.delenv("CONVEYOR_CI_NO_SKIP", raising=False)  # this session may itself run under it (.ci/run)
    pytester.runpytest().assert_outcomes(skipped=3)  # on a developer's machine a skip stays a skip
    monkeypatch.setenv("CONVEYOR_CI_NO_SKIP", "1")
    result = pytester.runpytest("-rs")
    result.assert_outcomes(failed=1, errors=1, skipped=1)  # a skipif fails in its setup: an error
    result.stdout.fnmatch_lines(["*CI should have provided it: needs Debian's chromium*"])
