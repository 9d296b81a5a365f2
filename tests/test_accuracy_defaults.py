"""The recipes as a newcomer types them, defaults only, reach the reference code's accuracy
(issue 16): the mean of three seeds, on the real MNIST and CIFAR-10 files, against the figure the
reference articles' own code reached (`accuracy.REFERENCE_CODE`; its mean over the same three seeds
was lower: 97.22 % and 66.57 % on 2026-12-02). The six runs only: the reference code's own runs,
which `accuracy.py --only defaults` pairs with them for the speed ratio, are a benchmark (they took
more than half of this test's 41-47 minutes in CI; without them 17:20 in CI on 2026-12-07). So it
runs with `make slow`, not in the default suite."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_DATASETS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs_shared,
    pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason="needs ../shared/datasets"),
]


def test_the_defaults_never_lose_to_the_reference_code(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # without conftest.FAKE_CPU: the defaults this CPU really gets
    sys.path.insert(0, str(REPO / "benchmarks"))
    import accuracy

    out = tmp_path / "accuracy.json"
    rows = ",".join(f"{key}_defaults_s{seed}" for seed in accuracy.DEFAULT_SEEDS for key in accuracy.REFERENCE_CODE)
    command = [sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--only", rows, "--out", str(out)]
    subprocess.run([*command, "--work", str(tmp_path / "work")], check=True, timeout=3600)
    summary = accuracy.defaults_summary(json.loads(out.read_text()))
    assert set(summary) == set(accuracy.REFERENCE_CODE)
    for key, row in summary.items():
        assert "reference" not in row  # the six runs only
        assert len(row["runs"]) == len(accuracy.DEFAULT_SEEDS)
        assert row["mean"] >= accuracy.REFERENCE_CODE[key], (key, row)
