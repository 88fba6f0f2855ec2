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


@pytest.mark.slow
def test_ab_of_a_layer_shape():
    # contiguous: no side needs the compiled kernel (whose build for the revision would take most of the test's time)
    result = run("--against", "HEAD", "--layer", "dw3x3 576", "--format", "contiguous", "--rounds", "2", "--launches",
                 "1", "--batch-size", "2", "--pause", "0")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("working tree against HEAD: dw3x3 576 @14, contiguous"), out
    # the layer's own sizes: inference at its listed 14², the training step at half of it
    assert re.search(r"^batch @14, all launches: .* tree faster in [0-2]/2 rounds$", out, flags=re.M), out
    assert re.search(r"^train @7, all launches: .* tree faster in [0-2]/2 rounds$", out, flags=re.M), out
    difference = float(re.search(r"relative to the largest output (\S+)", out).group(1))
    src_clean = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "src"]).returncode == 0
    if src_clean:
        assert difference == 0.0, out


def test_ab_layer_must_name_one_shape():
    result = run("--against", "HEAD", "--layer", "3x3")
    assert result.returncode != 0
    assert "'3x3' matches 5: ['3x3 64->64 @56', '3x3 256->256 @14', '3x3 512->512 @7', 'dw3x3 144 @56', " \
        "'dw3x3 576 @14']" in result.stderr
