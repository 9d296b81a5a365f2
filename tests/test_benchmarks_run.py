"""Every benchmark script still runs against the package as it is now, at the smallest sizes
(issue 19: a full `benchmarks/run_all.py` failed in input_pipeline.py after the augmenter's
signature changed, and nothing had noticed). Speed is not asserted here: the scripts measure it."""

import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

# --no-write: the results files beside the scripts hold full-size runs
SMALLEST = {
    "train_step mlp": [
        "train_step.py",
        *("--model", "mlp", "--examples", "256", "--repeats", "1", "--epochs-per-fit", "1", "--spe", "1,16"),
        *("--jit", "--bf16"),
    ],
    "train_step cnn": [
        "train_step.py",
        *("--model", "cnn", "--examples", "128", "--repeats", "1", "--epochs-per-fit", "1", "--spe", "16"),
        "--bf16",
    ],
    "input_pipeline": ["input_pipeline.py", "--examples", "128", "--repeats", "1"],
    "feature_cache": ["feature_cache.py", "--image-size", "32", "--examples", "64", "--repeats", "1"],
    "prefix_cache": [
        "prefix_cache.py",
        *("--image-size", "32", "--train", "32", "--validation", "8", "--repeats", "1", "--batch-size", "8"),
        "--no-write",
    ],
    "short_epochs": ["short_epochs.py", "--sizes", "128,256", "--repeats", "1", "--epochs", "2", "--no-write"],
    "keras_epoch_cost": ["keras_epoch_cost.py", "--repeats", "1", "--epochs", "2"],
    "scaling": ["scaling.py", "--examples", "256", "--repeats", "1", "--batch-sizes", "32,64"],
    "threads": ["threads.py", "--quick", "--rounds", "1", "--settings", "0:0", "--only", "cnn augmented", "--no-write"],
}


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_the_benchmark_runs_and_names_the_machine(name, tmp_path):
    script, *args = SMALLEST[name]
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = [line for line in proc.stdout.splitlines() if line.startswith("#")]
    assert any("cores" in line and "tensorflow" in line for line in header), proc.stdout[:2000]
    assert len(proc.stdout.splitlines()) > len(header), proc.stdout  # a table follows the header
