"""What a newcomer relies on: the README's commands, the Makefile, .ci/run, extras, shipped data."""

import re
import subprocess
import sys
from pathlib import Path

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
    root = REPO / "kerastune_flow" / "sample_data" / "digits"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert classes == [str(i) for i in range(10)]
    counts = [len(list((root / c).glob("*.png"))) for c in classes]
    assert sum(counts) == 1797 and min(counts) >= 170
    readme = (root.parent / "README.md").read_text()
    assert "CC BY 4.0" in readme and "make_digits.py" in readme


def _package_data():
    """{package: [glob, ...]} of pyproject.toml, as paths under kerastune_flow/."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {
        Path(*package.split(".")[1:]): globs for package, globs in setuptools.get("package-data", {}).items()
    }, setuptools


def test_the_wheel_ships_every_sub_package_the_sample_and_py_typed():
    package_data, setuptools = _package_data()
    # found, not listed: a new sub-package is shipped without an edit of pyproject.toml
    assert setuptools["packages"] == {"find": {"include": ["kerastune_flow*"]}}
    shipped = {
        path.relative_to(REPO / "kerastune_flow")
        for folder, globs in package_data.items()
        for pattern in globs
        for path in (REPO / "kerastune_flow" / folder).glob(pattern)
    }
    digits = REPO / "kerastune_flow" / "sample_data" / "digits"
    assert {p.relative_to(REPO / "kerastune_flow") for p in digits.rglob("*.png")} <= shipped
    assert len([p for p in shipped if p.suffix == ".png"]) == 1797
    assert Path("py.typed") in shipped and (REPO / "kerastune_flow" / "py.typed").is_file()
    assert Path("sample_data/README.md") in shipped  # the sample's source and CC BY 4.0 attribution


def test_the_license_is_apache_2_as_an_spdx_expression_with_its_full_text():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0"  # a string: the TOML table is deprecated and warns on install
    assert project["license-files"] == ["LICENSE"]
    setuptools = next(r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools"))
    assert int(re.search(r">=(\d+)", setuptools).group(1)) >= 77  # the first setuptools that reads both
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 150


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
