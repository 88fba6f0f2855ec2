"""benchmarks/ab.py: the revision is exported and served by its own workers, which compute the same network."""

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ab.py"


def git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not git_checkout(), reason="needs a git checkout")


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")}, timeout=600)


@pytest.mark.slow
def test_ab_against_head_runs_both_figures():
    result = run("--against", "HEAD", "--rounds", "2", "--launches", "2", "--batch-size", "2", "--image-size", "32",
                 "--train-image-size", "32", "--pause", "0")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for figure in ("batch", "train"):
        for launch in (1, 2):
            assert re.search(rf"^{figure} @32, launch {launch}: static .* tree faster in [0-2]/2 rounds$", out,
                             flags=re.M), out
        assert re.search(rf"^{figure} @32, all launches: .* tree faster in [0-4]/4 rounds$", out, flags=re.M), out
    difference = float(re.search(r"relative to the largest output (\S+)", out).group(1))
    src_clean = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "src"]).returncode == 0
    if src_clean:  # the same code on both sides, the same seed and input: the same numbers
        assert difference == 0.0, out


def test_ab_unknown_revision_is_named():
    result = run("--against", "no-such-revision-xyz")
    assert result.returncode != 0
    assert "no-such-revision-xyz" in result.stderr


def test_ab_rejects_zero_rounds():
    result = run("--against", "HEAD", "--rounds", "0")
    assert result.returncode != 0 and "--rounds must be at least 1. Received: 0" in result.stderr
