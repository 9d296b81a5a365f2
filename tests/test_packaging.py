"""What a newcomer relies on: the README's commands, the Makefile, .ci/run, extras, shipped data."""

import re
import subprocess
import sys

import tomllib
from conftest import REPO


def _readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_command():
    commands = _readme_commands()
    assert "make test" in commands and "make demo" in commands
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci
    assert "set -euo pipefail" in ci


def test_make_targets_create_the_venv_and_install_first():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: \$\(STAMP\)", makefile, flags=re.M)
    assert re.search(r"^lint: \$\(STAMP\)", makefile, flags=re.M)
    assert re.search(r"^test: lint$", makefile, flags=re.M)
    assert "-m venv $(VENV)" in makefile and "pip install" in makefile
    dry = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0 and "pytest" in dry.stdout


def test_tensorflow_is_an_extra_not_a_base_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("tensorflow") and "datasets" not in dep for dep in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["cpu"][0].startswith("tensorflow-cpu")
    assert extras["gpu"][0].startswith("tensorflow[and-cuda]")
    assert extras["tpu"][0].startswith("tensorflow-tpu")
    assert any(dep.startswith("pytest") for dep in extras["dev"])


def test_import_without_tensorflow_names_the_extra():
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "try:\n import kerastune_flow\nexcept ImportError as e:\n print(e)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    message = proc.stdout.strip()
    assert "pip install 'kerastune_flow[cpu]'" in message
    assert len(message.splitlines()) == 1


def test_shipped_digits_are_a_complete_image_folder():
    root = REPO / "data" / "digits"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert classes == [str(i) for i in range(10)]
    counts = [len(list((root / c).glob("*.png"))) for c in classes]
    assert sum(counts) == 1797 and min(counts) >= 170
    readme = (REPO / "data" / "README.md").read_text()
    assert "CC BY 4.0" in readme and "make_digits.py" in readme


def test_the_version_is_written_once():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kerastune_flow.__version__"}
    init = (REPO / "kerastune_flow" / "__init__.py").read_text()
    written = re.findall(r'^__version__ = "([^"]+)"$', init, flags=re.M)
    assert len(written) == 1
    from importlib.metadata import version

    assert version("kerastune_flow") == written[0]  # the installed metadata reads it from there


def test_make_test_lints_first():
    dry = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
    lines = dry.stdout.splitlines()
    ruff = [i for i, line in enumerate(lines) if "ruff" in line]
    pytest_line = next(i for i, line in enumerate(lines) if "pytest" in line)
    assert any("ruff check" in lines[i] for i in ruff) and any("ruff format --check" in lines[i] for i in ruff)
    assert max(ruff) < pytest_line
    assert "flake8" not in (REPO / "setup.cfg").read_text()
