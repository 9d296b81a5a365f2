"""The package's layout: one job per module, none over 400 lines and no function over 80, imports at the
top and one way."""

import ast
from pathlib import Path

import pytest

# Not conftest's REPO: `python tests/test_layout.py` checks README.md's tree without starting TensorFlow.
REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kerastune_flow"
MAX_LINES = 400
MAX_FUNCTION_LINES = 80  # a function longer than a screen is two jobs
# Each module imports only modules of a lower rank: errors and config at the bottom, run at the top.
RANKS = {
    "errors": 0,
    "runtime.environment": 0,  # the environment variables the package reads, in one table
    "runtime.logs": 1,  # each log line once: TensorFlow's native lines at import, the CLI's handlers
    "runtime.progress": 1,  # a leaf: the progress of long steps, used from data up to run
    # The floor's packages have levels of their own, so their modules take fractions below the package.
    "config.parsing": 0,  # setting values from text: 150x150, flip,crop, 1e-3 or auto
    "config.presets": 0,  # named presets: smoke and reference
    "config.settings": 0.5,  # the settings: one dataclass field each, with its flag's name, help and choices
    "config.values": 0.75,  # settings from Python or text, from a config.json, validated
    "config": 1,
    "runtime.compat": 2,
    "runtime.device": 2,  # device and precision policy: detection in one place, the dtype policy of a run
    "runtime.strategy": 3,
    "rundir.writes": 1,  # atomic writes and the errors of a write that failed
    "rundir.files": 1.2,  # the names of a run's files, and its history files
    "rundir.claim": 1.4,  # whose folder it is; creating, resuming and clearing a run's folder
    "rundir.lock": 1.4,  # one process per output folder: the lock file
    "rundir.unfinished": 1.6,  # the unfinished run a command without --run-dir takes up
    "rundir": 2,
    "training.lr_suggest": 1,  # reading a rate off a range test's curve (the rules)
    "training.lr_range": 2,
    "training.resume": 3,
    "training.guards": 3,  # callbacks that stop a fit before harm: NaN, full disk, a signal
    "training.callbacks": 4,
    "training.tracking_store": 4.5,  # MLflow's side of tracking: a run's client that warns once, opening a run
    "training.tracking": 5,  # MLflow tracking (optional): a run's MLflow run, its epochs, parent runs for search
    "runtime.process": 4,
    "reports.plots": 3,
    "reports": 3,  # the one report builder: writes report.md and report.html through rundir
    "data.samples": 1,  # the sample data shipped in the package, by name (`--data digits`)
    "data.augment": 2,
    "data.sources": 3,
    "data.order": 1,  # the epoch clock: each epoch's order follows from (seed, epoch)
    "data.pipeline": 3,
    "data.images": 4,
    "data.folders": 5,
    "data.tables": 5,  # a CSV/TSV file of image paths and labels, indexed for folders' split and loading
    "data.folds": 4,  # cross-validation folds of any DataSplits (sources' class)
    "data.loading": 6,
    "data": 7,
    "models.heads": 3,
    "models.saving": 3,
    "models.backbones": 3,
    "models.hub": 3.5,  # KerasHub presets as bases: the supported families, their blocks, the converter as a layer
    "models.scratch": 4,
    "models.transfer": 4,
    "models": 5,
    "training.fitting": 7,  # one fit, and the one place training compiles (it reads the recipe's head)
    "training.stages": 7,  # the plan of a fine-tune's second stage: steps, names, boundaries
    "training.setup": 8,  # a run's set-up, shared by train and find-lr
    "training.caches": 4,
    "training.view_cache": 7.5,  # K augmented views of the training images through a frozen part, once
    "recipes": 6,
    "training.finetune": 8,
    "deploy.inference": 8,
    "training.train": 9,
    "deploy.analysis": 9,
    "training.lr_find": 10,
    "search.compare_report": 5,  # compare's recommendation and report pages
    "search.compare": 10,
    "deploy.artifacts": 3,
    "deploy.converters": 4,  # a Keras model as a SavedModel, LiteRT or ONNX file (export's writers)
    "deploy.export": 10,
    "cli.model_commands": 11,  # the flags of evaluate, predict and export
    "cli.flags": 2,  # the config flags, generated from the config's fields
    "search.tune_space": 10,
    "search.tune_report": 4,
    "search.tune_hparams": 5,  # the trials in TensorBoard's HParams view, written as each ends
    "search.tune_final": 10,  # after a search: the best and the defaults over seeds on the test split
    "search.tuner": 10,  # KerasTuner's side of tune: the oracle, the Tuner, the chief's server
    "search.tune": 11,
    "cli.parser": 12,  # the parser of every command, one function each
    "run": 13,
    "": 14,  # kerastune_flow/__init__.py: the public names
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
    "runtime": 2,
    "rundir": 2,
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
def test_no_module_is_over_400_lines(name, path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


@pytest.mark.parametrize("name, path", list(_modules()), ids=lambda v: str(v))
def test_no_function_is_over_80_lines(name, path):
    long = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert not long


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


# --------------------------------------------------------------------------- README.md's map of the package

README_SECTION = "## Layout"  # README.md's tree of kerastune_flow/, one line per module or sub-package


def _tree_entries(lines: list[str]) -> dict[str, str]:
    """The modules a tree of kerastune_flow/ names: dotted name (as `_modules` gives it) -> path.

    A line is an entry when its first word ends in `.py` or `/` and it sits two spaces per level
    under the tree's `kerastune_flow/` line; a sub-package's line (`data/`) stands for its
    `__init__.py`. Description lines that run on, indented deeper, are skipped; the first line back
    at the margin (`notebooks/`) ends the package.
    """
    folders: list[str] = []
    named = {}
    for line in lines[lines.index("kerastune_flow/") + 1 :]:
        if not line.startswith("  "):
            break
        word = line.split()[0]
        depth, odd = divmod(len(line) - len(line.lstrip()), 2)
        if odd or depth > len(folders) + 1 or not word.endswith((".py", "/")):
            continue
        del folders[depth - 1 :]
        path = "/".join([*folders, word.rstrip("/")])
        if word.endswith("/"):
            folders.append(word.rstrip("/"))
        named[path.removesuffix(".py").removesuffix("__init__").strip("/").replace("/", ".")] = path
    return named


def readme_difference() -> tuple[list[str], list[str]]:
    """(the modules README.md's layout tree leaves out, the paths it names that kerastune_flow/ lacks)."""
    section = (REPO / "README.md").read_text().split(f"\n{README_SECTION}\n", 1)[1].split("\n## ", 1)[0]
    named = _tree_entries(section.split("```", 2)[1].splitlines())
    missing = [str(path.relative_to(PACKAGE)) for name, path in _modules() if name not in named]
    gone = [path for path in named.values() if not (PACKAGE / path).exists()]
    return missing, gone


def test_readme_layout_names_every_module_and_no_other():
    missing, gone = readme_difference()
    assert not missing, f"add a line to README.md's {README_SECTION} tree for each of {missing}"
    assert not gone, f"README.md's {README_SECTION} tree names what kerastune_flow/ no longer has: {gone}"


def test_the_tree_reader_nests_entries_and_skips_descriptions():
    tree = [
        "kerastune_flow/",
        "  __init__.py     the public names",
        "  data/           data in, pipelines out",
        "    folders.py    image folders: train/ and valid/",
        "                  split folders/ by name (a run-on line)",
        "  run.py          the command line",
        "notebooks/        outside the package",
        "  other.py        not ours",
    ]
    expected = {"": "__init__.py", "data": "data", "data.folders": "data/folders.py", "run": "run.py"}
    assert _tree_entries(tree) == expected


if __name__ == "__main__":  # python tests/test_layout.py: what README.md's tree lacks, and names in vain
    missing, gone = readme_difference()
    for kind, paths in (("missing from README.md", missing), ("gone, still in README.md", gone)):
        for path in paths:
            print(f"{kind}: kerastune_flow/{path}")
    raise SystemExit(1 if missing or gone else 0)
