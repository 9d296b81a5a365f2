"""A tracked run as a person sees it: `mlflow server` serves the test's store on a loopback port, and
headless Chromium (Debian's, see browser_check.py) opens the experiment's runs page (the run listed)
and the run's metric charts (a curve drawn). Slow: MLflow's server takes tens of seconds to start.
Skipped where the browser, selenium or mlflow is absent."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import browser_check
import pytest
from conftest import REPO, smoke

from kerastune_flow.training import train

if browser_check.missing():
    pytest.skip(browser_check.missing(), allow_module_level=True)
mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow

SCREENSHOTS = REPO / "runs" / "screenshots"  # git-ignored; kept after the run for a person
SERVER_START_SECONDS = 180  # MLflow's server imports, migrates and starts uvicorn: 15-60 s on 2 busy cores
PAGE_SECONDS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def server(tmp_path):
    """`mlflow server` on the test's sqlite store and a free loopback port: (its URL, the store's URI)."""
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    if not mlflow_cli.is_file():
        pytest.skip(f"no mlflow command beside {sys.executable}")
    uri, port = f"sqlite:///{tmp_path / 'mlflow.db'}", _free_port()
    # No background job workers (MLflow's GenAI jobs: seven more processes), and no telemetry.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [str(mlflow_cli), "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    with open(tmp_path / "server.log", "wb") as log:
        # A session of its own: the server and its uvicorn worker end together, by the group's ID.
        proc = subprocess.Popen([*command, "--workers", "1"], env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not _answers(f"{url}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
        yield url, uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_mlflow_ui_lists_the_run_and_draws_its_metric_charts(server, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, uri = server
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    config = smoke("scratch_mlp", "digits", epochs=3, patience=5, track="mlflow", tracking_uri=uri, verbose=0)
    train.train_and_evaluate(config, tmp_path / "ui_run")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("scratch_mlp")
    found = client.search_runs([experiment.experiment_id])[0]
    driver = browser_check._driver()
    try:
        wait = WebDriverWait(driver, PAGE_SECONDS)
        driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs")
        wait.until(lambda d: "ui_run" in d.find_element(By.TAG_NAME, "body").text)
        assert "1 matching run" in driver.find_element(By.TAG_NAME, "body").text
        driver.save_screenshot(str(tmp_path / "mlflow_runs.png"))

        driver.get(f"{url}/#/experiments/{experiment.experiment_id}/runs/{found.info.run_id}/model-metrics")
        # Plotly draws each metric's chart; a curve is an SVG path through the three epochs' points.
        curves = (
            "return Array.from(document.querySelectorAll('.js-plotly-plot path.js-line')).map(p => p.getAttribute('d'))"
        )
        wait.until(lambda d: any(path and path.count("L") >= 2 for path in d.execute_script(curves)))
        text = driver.find_element(By.TAG_NAME, "body").text
        # A chart for every metric the run logged (the page draws those in view; their count is its heading).
        shown = re.search(r"Model metrics\s*\((\d+)\)", text)
        assert shown and int(shown.group(1)) == len(found.data.metrics) and {"accuracy", "loss"} <= set(text.split())
        driver.save_screenshot(str(tmp_path / "mlflow_metrics.png"))
    finally:
        driver.quit()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name in ("mlflow_runs.png", "mlflow_metrics.png"):
        shutil.copyfile(tmp_path / name, SCREENSHOTS / name)
