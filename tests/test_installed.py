"""The built wheel, installed in a fresh virtual environment, runs README.md's commands outside the clone.

Slow (about two minutes): the wheel is built from a copy of the clone with `pip wheel --no-deps` (pip
fetches the build backend, setuptools>=77, or takes it from its cache) and installed with `--no-deps
--no-index` into a new virtual environment that sees this machine's packages through a .pth file (TensorFlow,
Keras and the export runtimes; the clone's editable install is not among them: a .pth line adds a folder,
it does not run the .pth files inside it). Then, from an empty temporary folder:

- the lines of README's "Installed anywhere" block: `--version`, the demo's train, evaluate and predict;
- Deploy's commands, then its Python loading snippet, as written.

The lines are read from README.md's code blocks, so the test fails when the README drifts from what
works. One substitution keeps it short, and is the only one: the demo's `--epochs 10` runs as
`--preset smoke` (2 epochs on at most 64 images a split).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

README = REPO / "README.md"
COMMAND = "kerastune-flow"
SMOKE = {"--epochs 10": "--preset smoke"}  # the demo at smoke size: the one change to README's lines
# What the copy leaves out: folders of the clone's root only (a package folder may share a name: the
# package's deploy/ sub-package and README's `--out deploy/digits`), and build litter anywhere.
NOT_COPIED_AT_ROOT = {".venv", ".git", "runs", "build", "dist", ".pytest_cache", "deploy"}
NOT_COPIED_ANYWHERE = shutil.ignore_patterns("*.egg-info", "__pycache__")


def _not_copied(folder: str, names: list[str]) -> set[str]:
    at_root = NOT_COPIED_AT_ROOT & set(names) if Path(folder) == REPO else set()
    return at_root | NOT_COPIED_ANYWHERE(folder, names)


def _section(heading: str) -> str:
    """README's text under `heading` (## or ###), up to the next heading of the same or a higher level."""
    lines = README.read_text().splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.lstrip("#").strip() == heading), None)
    assert start is not None and lines[start].startswith("#"), f"README.md has no heading {heading!r}"
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    fenced, end = False, len(lines)
    for i in range(start + 1, len(lines)):
        fenced ^= lines[i].startswith("```")  # a Python comment in a code block is not a heading
        if not fenced and re.match(rf"#{{1,{level}}} ", lines[i]):
            end = i
            break
    return "".join(lines[start + 1 : end])


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(argv)} ended with {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv, environment): the wheel built from a copy of the clone, installed in a new venv."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=_not_copied)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(root / "dist"), "."], source, env)
    (wheel,) = (root / "dist").glob("kerastune_flow-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", purelib], root, env).stdout.strip())
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index"]
    _run([*pip, str(wheel)], root, env)
    # only then this machine's packages: pip, installing, never sees (nor touches) the clone's editable install
    (site / "machine_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    return wheel, venv, env


def test_the_wheel_holds_the_sample_the_license_and_py_typed(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert len([n for n in names if n.startswith("kerastune_flow/sample_data/digits/") and n.endswith(".png")]) == 1797
    assert "kerastune_flow/py.typed" in names and "kerastune_flow/sample_data/README.md" in names
    assert {"kerastune_flow/data/samples.py", "kerastune_flow/models/heads.py"} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    license_text = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/licenses/LICENSE")))
    assert b"Apache License" in license_text and b"END OF TERMS AND CONDITIONS" in license_text


def _command(line: str, venv: Path) -> list[str]:
    for old, new in SMOKE.items():
        line = line.replace(old, new)
    words = shlex.split(line, comments=True)
    assert words[0] == COMMAND, f"README line is not a {COMMAND} command: {line}"
    return [str(venv / "bin" / COMMAND), *words[1:]]


def test_the_readme_runs_from_the_installed_wheel_outside_the_clone(installed, tmp_path):
    wheel, venv, env = installed
    work = tmp_path / "elsewhere"  # not the clone: nothing of it on the path or in the folder
    work.mkdir()
    python = str(venv / "bin" / "python")
    where = _run([python, "-c", "import kerastune_flow; print(kerastune_flow.__file__)"], work, env)
    assert Path(where.stdout.strip()).is_relative_to(venv)

    (install,) = _blocks(_section("Installed anywhere: the wheel and `kerastune-flow`"), "bash")
    lines = [line for line in install.splitlines() if line.strip()]
    assert lines[0].startswith("pip install ")
    assert Path(shlex.split(lines[0])[2].split("[")[0]).name == wheel.name  # the README names the wheel built
    outputs = {}
    for line in lines[1:]:
        outputs[line] = _run(_command(line, venv), work, env).stdout
    version = outputs[f"{COMMAND} --version"]
    assert re.match(rf"{COMMAND} \d+\.\d+\.\d+ \(keras .*, tensorflow .*\)", version), version
    config = json.loads((work / "runs" / "demo" / "config.json").read_text())
    assert config["config"]["data"]["data"] == "digits"  # the name, as typed: the sample of the installed package
    evaluated = next(out for line, out in outputs.items() if " evaluate " in line)
    assert str(venv) in evaluated  # its test split names the sample inside the venv's site-packages

    deploy = _section("Deploy")
    (commands,) = _blocks(deploy, "bash")
    for line in commands.splitlines():
        if line.strip():
            _run(_command(line, venv), work, env)
    (snippet,) = _blocks(deploy, "python")
    (work / "load_each.py").write_text(snippet)
    shown = _run([python, "load_each.py"], work, env).stdout
    assert re.fullmatch(r"\[('\d', ){3}'\d'\]\n", shown), shown  # the ONNX model's classes of 4 images


def test_the_readmes_python_runs_from_the_installed_wheel(installed, tmp_path):
    """README's "Python" snippets, as written, in a folder outside the clone."""
    _, venv, env = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    python = str(venv / "bin" / "python")
    first, second = _blocks(_section("Python"), "python")
    (work / "first.py").write_text(first)
    printed = [line for line in _run([python, "first.py"], work, env).stdout.splitlines() if line.startswith("{")]
    assert "'accuracy'" in printed[0] and printed[0].endswith("runs/my_finetune")  # the test metrics, the run dir
    assert "learning_rate" in printed[-1]  # the best trial's hyperparameters (Keras' epoch lines are not dicts)
    assert json.loads((work / "runs" / "lr" / "lr_find.json").read_text())["suggestion"] > 0
    assert (work / "runs" / "search" / "report.html").is_file()
    (work / "second.py").write_text(second)
    metrics = _run([python, "second.py"], work, env).stdout.strip().splitlines()[-1]
    assert "'accuracy'" in metrics
    assert (work / "runs" / "cnn").is_dir()
