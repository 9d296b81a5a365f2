"""The package's layout: one job per module, none over 500 lines, imports at the top and one way."""

import ast

import pytest
from conftest import REPO

PACKAGE = REPO / "kerastune_flow"
MAX_LINES = 500
# Each module imports only modules of a lower rank: errors and config at the bottom, run at the top.
RANKS = {
    "errors": 0,
    "runtime.logs": 0,  # each log line once: TensorFlow's native lines at import, the CLI's handlers
    "runtime.progress": 1,  # a leaf: the progress of long steps, used from data up to run
    "config": 1,
    "runtime.compat": 2,
    "runtime.strategy": 2,
    "rundir": 2,
    "runlock": 3,  # one process per output folder: the lock file
    "unfinished": 4,  # the unfinished run a command without --run-dir takes up
    "training.lr_range": 2,
    "training.resume": 3,
    "training.callbacks": 4,
    "runtime.process": 3,
    "reports.plots": 3,
    "reports": 2,
    "data.samples": 1,  # the sample data shipped in the package, by name (`--data digits`)
    "data.augment": 2,
    "data.sources": 3,
    "data.pipeline": 3,
    "data.images": 4,
    "data.folders": 5,
    "data.tables": 5,  # a CSV/TSV file of image paths and labels, indexed for folders' split and loading
    "data.loading": 6,
    "data": 7,
    "models.heads": 3,
    "models.saving": 3,
    "models.backbones": 3,
    "models.scratch": 4,
    "models.transfer": 4,
    "models": 5,
    "training.fitting": 5,
    "training.caches": 4,
    "recipes": 6,
    "training.finetune": 8,
    "deploy.inference": 8,
    "training.train": 9,
    "deploy.analysis": 9,
    "training.lr_find": 10,
    "search.compare": 10,
    "deploy.artifacts": 3,
    "deploy.export": 10,
    "cli.model_commands": 11,  # the flags of evaluate, predict and export
    "flags": 2,
    "search.tune_space": 10,
    "search.tune_report": 4,
    "search.tune": 11,
    "run": 12,
    "": 13,  # kerastune_flow/__init__.py: the public names
    "runtime": 0,  # the sub-packages' __init__ files: a docstring each
    "training": 0,
    "search": 0,
    "deploy": 0,
    "cli": 0,
    "sample_data.make_digits": 0,  # the script that wrote the digits sample (imports no package module)
}
# The sub-packages (and the modules on the floor beside them) by job, lowest first: a module imports
# only from its own sub-package (by RANKS) or from a lower layer. Training uses nothing from deploy or
# search; reports use only the files of a run.
LAYERS = {
    "errors": 0,
    "config": 1,
    "flags": 2,  # settings as text: the flags' table, shared by the command line and the Python API
    "runtime": 2,
    "rundir": 2,
    "runlock": 3,
    "unfinished": 4,
    "reports": 3,
    "data": 4,
    "models": 4,
    "recipes": 5,
    "training": 6,
    "deploy": 6,
    "search": 7,
    "cli": 8,
    "run": 9,
    "sample_data": 0,
    "": 10,
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        yield name, path


def _package_imports(tree: ast.Module) -> set[str]:
    """kerastune_flow modules imported at module level (not for type annotations only)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("kerastune_flow"):
                base = sub.module.removeprefix("kerastune_flow").lstrip(".")
                for alias in sub.names:
                    candidate = f"{base}.{alias.name}".lstrip(".")
                    found.add(candidate if candidate in RANKS else base)
            elif isinstance(sub, ast.Import):
                found.update(
                    a.name.removeprefix("kerastune_flow.") for a in sub.names if a.name.startswith("kerastune_")
                )
    return found


def test_every_module_has_a_rank():
    assert sorted(name for name, _ in _modules()) == sorted(RANKS)


@pytest.mark.parametrize("name, path", list(_modules()), ids=lambda v: str(v))
def test_no_module_is_over_500_lines(name, path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


@pytest.mark.parametrize("name, path", list(_modules()), ids=lambda v: str(v))
def test_imports_flow_one_way(name, path):
    upward = {m: RANKS[m] for m in _package_imports(ast.parse(path.read_text())) if RANKS[m] >= RANKS[name]}
    assert not upward, f"{name} (rank {RANKS[name]}) imports {upward}"


@pytest.mark.parametrize("name, path", list(_modules()), ids=lambda v: str(v))
def test_sub_packages_import_only_lower_layers(name, path):
    layer = name.split(".")[0]
    imported = {m.split(".")[0] for m in _package_imports(ast.parse(path.read_text()))}
    upward = {m: LAYERS[m] for m in imported if m != layer and LAYERS[m] >= LAYERS[layer]}
    assert not upward, f"{name} (layer {layer}, {LAYERS[layer]}) imports {upward}"


def test_every_top_level_name_has_a_layer():
    assert {name.split(".")[0] for name, _ in _modules()} == set(LAYERS)


@pytest.mark.parametrize("name, path", list(_modules()), ids=lambda v: str(v))
def test_no_import_hides_inside_a_function(name, path):
    tree = ast.parse(path.read_text())
    hidden = [
        f"line {sub.lineno}: {ast.unparse(sub)}"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for sub in ast.walk(node)
        if isinstance(sub, (ast.Import, ast.ImportFrom))
    ]
    assert not hidden


def test_no_branch_on_a_recipe_name():
    # Recipes are told apart by their record's fields (transfer, staged, head, ...), not by name.
    offenders = []
    for name, path in _modules():
        if name in ("recipes", "compare"):  # the records themselves; compare's table of approaches
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant)
                and c.value in ("scratch_mlp", "cifar10_cnn", "vgg16_features", "vgg16_finetune")
                for c in [node.left, *node.comparators]
            ):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders
