"""The test process ends with pytest's own exit status (tests/conftest.py ends it with os._exit
after the report, to keep third-party teardown crashes out of CI): a failing test still fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fails_when_asked():
    if os.environ.get("MIAS_SAM_EXIT_PROBE") != "fail":
        pytest.skip("only run by test_exit_status_is_pytests")
    assert False, "asked to fail"


@pytest.mark.parametrize("probe, status", [("fail", 1), ("pass", 0)])
def test_exit_status_is_pytests(probe, status):
    env = dict(os.environ, MIAS_SAM_EXIT_PROBE=probe)
    env.pop("MIAS_SAM_TESTS_PLAIN_EXIT", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{Path(__file__).name}::test_fails_when_asked"],
                          cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == status, done.stdout[-2000:] + done.stderr[-2000:]
    assert ("1 failed" if probe == "fail" else "1 skipped") in done.stdout
