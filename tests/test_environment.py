"""The environment variables: every one the package reads is in README.md's one table, and importing the
package sets none."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from kerastune_flow.runtime import environment

PACKAGE = REPO / "kerastune_flow"
README = REPO / "README.md"
SECTION = "## Environment variables"
HEADER = ("| Variable | Read by | What it does | When unset |", "| --- | --- | --- | --- |")
# `os.environ.<method>(name, ...)` and `os.<function>(name, ...)` that read or write one variable.
ENVIRON_METHODS = ("get", "setdefault", "pop")
OS_FUNCTIONS = ("os.getenv", "os.putenv", "os.unsetenv")
# The package's own readers: `read` refuses a name that is not in the table, so these calls need no
# static name (`tpu_hinted` reads the TPU hints in a loop).
OWN_READERS = ("environment.read", "environment.is_on")


def table_rows(variables=environment.VARIABLES) -> list[str]:
    """README.md's table as `VARIABLES` writes it."""
    return [*HEADER, *(f"| `{v.name}` | {v.read_by} | {v.does} | {v.default} |" for v in variables)]


def readme_rows(text: str) -> list[str]:
    """The table of the section Environment variables in `text`: its lines starting with "|"."""
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n#", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("|")]


def variable_reads(source: str, namespace: dict) -> tuple[set[str], list[str]]:
    """The environment variables `source` reads or writes through `os`, resolved in `namespace`
    (a literal or a module constant), and the places whose name cannot be resolved so."""
    names, unresolved = set(), []

    def resolve(node: ast.AST, strict: bool = True) -> None:
        try:
            value = eval(compile(ast.Expression(node), "<name>", "eval"), dict(namespace))  # noqa: S307
        except Exception:  # a local variable: only the package's own reader may take one
            if strict:
                unresolved.append(f"line {node.lineno}: {ast.unparse(node)}")
            return
        names.update([value] if isinstance(value, str) else value)

    tree = ast.parse(source)
    environ_uses = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = ast.unparse(node.func)
            if func in OS_FUNCTIONS or func in (f"os.environ.{m}" for m in ENVIRON_METHODS):
                resolve(node.args[0])
                environ_uses.add(id(node.func.value) if func.startswith("os.environ") else None)
            elif func.endswith(OWN_READERS):
                resolve(node.args[0], strict=False)
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            resolve(node.slice)
            environ_uses.add(id(node.value))
        elif isinstance(node, ast.Compare) and any(ast.unparse(c) == "os.environ" for c in node.comparators):
            resolve(node.left)
            environ_uses.update(id(c) for c in node.comparators)
    for node in ast.walk(tree):  # os.environ used whole (copied, updated): not one name
        if isinstance(node, ast.Attribute) and ast.unparse(node) == "os.environ" and id(node) not in environ_uses:
            unresolved.append(f"line {node.lineno}: os.environ as a whole")
    return names, unresolved


def package_reads() -> tuple[set[str], list[str]]:
    names, unresolved = set(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if path.name == "environment.py" or not any(w in source for w in ("environ", "getenv", "putenv")):
            continue
        module = ".".join(("kerastune_flow", *path.relative_to(PACKAGE).with_suffix("").parts))
        found, places = variable_reads(source, vars(importlib.import_module(module.removesuffix(".__init__"))))
        names |= found
        unresolved += [f"{path.relative_to(REPO)} {place}" for place in places]
    return names, unresolved


def test_readme_has_the_one_table_of_the_variables():
    expected = table_rows()
    assert readme_rows(README.read_text()) == expected, "README.md's table should read:\n" + "\n".join(expected)
    assert README.read_text().count("| Variable | Read by |") == 1  # one table, not two that drift apart


def test_every_variable_the_package_reads_is_in_the_table():
    names, unresolved = package_reads()
    assert not unresolved, "read variables by a literal or a module constant, or through environment.read"
    assert {"TF_CONFIG", "KERASTUNER_ORACLE_IP", "KERASTUNE_FLOW_DEBUG"} <= names  # the scan sees them
    documented = {row.split("`")[1] for row in readme_rows(README.read_text())[len(HEADER) :]}
    assert names <= documented, f"not in README.md's table: {sorted(names - documented)}"
    assert documented == environment.NAMES


def test_the_scan_finds_reads_writes_and_names_it_cannot_resolve():
    source = (
        "import os\nSWITCH = 'B'\n"
        "a = os.environ.get('A')\nb = os.getenv(SWITCH)\nos.environ['C'] = '1'\n"
        "d = 'D' in os.environ\nfor n in ('E',):\n    os.environ.get(n)\nenv = dict(os.environ)\n"
    )
    names, unresolved = variable_reads(source, {"SWITCH": "B"})
    assert names == {"A", "B", "C", "D"}
    assert [u.split(":")[0] for u in unresolved] == ["line 8", "line 9"]


def test_a_table_missing_a_variable_fails_the_check():
    rows = table_rows(environment.VARIABLES[1:])
    assert rows != readme_rows(README.read_text())
    assert environment.VARIABLES[0].name not in {row.split("`")[1] for row in rows[len(HEADER) :]}


def test_reading_an_undocumented_variable_is_refused(monkeypatch):
    monkeypatch.setenv("KERASTUNE_FLOW_NOT_A_SETTING", "1")
    with pytest.raises(ValueError, match="not among the documented environment variables"):
        environment.read("KERASTUNE_FLOW_NOT_A_SETTING")
    monkeypatch.setenv(environment.KERASTUNE_FLOW_DEBUG, "0")
    assert environment.read(environment.KERASTUNE_FLOW_DEBUG) == "0" and not environment.is_on("KERASTUNE_FLOW_DEBUG")
    monkeypatch.setenv(environment.KERASTUNE_FLOW_DEBUG, "1")
    assert environment.is_on(environment.KERASTUNE_FLOW_DEBUG)


_CHANGES = """
import json, os, sys
changes = []
for name in sys.argv[1:]:
    before = dict(os.environ)
    __import__(name)
    after = dict(os.environ)
    changes.append({k: after.get(k) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)})
print(json.dumps(changes))
"""


def import_changes(*modules: str) -> list[dict]:
    """The environment variables that importing each of `modules` in turn, in one fresh process,
    sets or changes (one dict a module), with KERAS_BACKEND and TF_CPP_MIN_LOG_LEVEL unset
    beforehand (as for a user who set neither)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL")}
    proc = subprocess.run(
        [sys.executable, "-c", _CHANGES, *modules], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_package_sets_no_environment_variable():
    # TensorFlow sets a few of its own when it is imported (TF2_BEHAVIOR, KMP_*, TPU_ML_PLATFORM...);
    # the package may set nothing more, KERAS_BACKEND and TF_CPP_MIN_LOG_LEVEL least of all.
    # One process: TensorFlow and Keras first, then the package, which must change nothing more.
    tensorflow, keras, package = import_changes("tensorflow", "keras", "kerastune_flow")
    assert package == {}
    assert not {"KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL"} & (set(tensorflow) | set(keras))


def test_the_import_check_sees_a_variable_set_at_import(tmp_path, monkeypatch):
    (tmp_path / "sets_one.py").write_text("import os\nos.environ.setdefault('KERAS_BACKEND', 'tensorflow')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert import_changes("sets_one") == [{"KERAS_BACKEND": "tensorflow"}]


def test_the_modules_the_table_names_exist():
    named = {word.strip("`,;") for v in environment.VARIABLES for word in v.read_by.split() if ".py" in word}
    missing = {name for name in named if not (PACKAGE / name).is_file() and not (REPO / name).is_file()}
    assert named and not missing
