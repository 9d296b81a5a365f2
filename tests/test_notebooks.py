"""Every notebook runs top to bottom on tiny settings, offline; committed notebooks carry no outputs."""

import ast

import nbformat
import pytest
from conftest import REPO
from IPython.core.inputtransformer2 import TransformerManager

from kerastune_flow.data.samples import sample_folder

NOTEBOOKS = REPO / "notebooks"
DIGITS = str(sample_folder("digits"))  # the sample shipped in the package
TINY = dict(MAX_EXAMPLES=64, EPOCHS=1, SHOW_TENSORBOARD=False)  # no TensorBoard server: the cell prints its command
PARAMETERS = {
    "01_train_from_scratch.ipynb": dict(DATA=DIGITS, **TINY),
    "02_full_training_cifar10.ipynb": dict(DATA=DIGITS, **TINY),
    "03_transfer_learning_vgg16.ipynb": dict(DATA=DIGITS, IMAGE_SIZE=(32, 32), WEIGHTS=None, **TINY),
    "04_fine_tuning_vgg16.ipynb": dict(DATA=DIGITS, IMAGE_SIZE=(32, 32), WEIGHTS=None, HEAD_EPOCHS=1, **TINY),
    "05_compare_approaches.ipynb": dict(
        DATA=DIGITS,
        TRAIN_FRACTIONS=(1.0,),
        WEIGHTS=None,
        HEAD_EPOCHS=1,
        MAX_EXAMPLES=32,
        EPOCHS=1,
        SHOW_TENSORBOARD=False,
    ),  # the sweep itself is tested in test_compare.py
    "06_tuning.ipynb": dict(DATA=DIGITS, EPOCHS=1, TRIALS=2, FOLDS=2, MAX_EXAMPLES=200, SHOW_TENSORBOARD=False),
    "colab_tpu.ipynb": dict(INSTALL=False, DATA=DIGITS, HEAD_EPOCHS=1, BATCH_SIZE=8, WEIGHTS=None, **TINY),
}


# curves, confusion matrices, misclassified grids and reports that each notebook shows
EXPECTED_PICTURES = {
    "01_train_from_scratch.ipynb": 3,
    "02_full_training_cifar10.ipynb": 3,
    "03_transfer_learning_vgg16.ipynb": 2,
    "04_fine_tuning_vgg16.ipynb": 1,
    "05_compare_approaches.ipynb": 1,
    "06_tuning.ipynb": 2,  # the range test's curve, the search's report
}
# Where each notebook's TensorBoard cell points (beside the notebook): event files must be there.
TENSORBOARD_LOGS = {
    "01_train_from_scratch.ipynb": "runs/notebook_scratch_mlp/tensorboard",
    "02_full_training_cifar10.ipynb": "runs/notebook_cifar10_cnn/tensorboard",
    "03_transfer_learning_vgg16.ipynb": "runs/notebook_vgg16_features_no_cache/tensorboard",
    "04_fine_tuning_vgg16.ipynb": "runs/notebook_vgg16_finetune/tensorboard",
    "05_compare_approaches.ipynb": "runs/notebook_compare",
    "06_tuning.ipynb": "runs/notebook_tuning/search/tensorboard",  # the trials in the HParams view
    "colab_tpu.ipynb": "runs/colab_vgg16_finetune/tensorboard",
}


def _load(name):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_every_notebook_is_listed_here_and_in_the_readme():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(PARAMETERS)
    readme = (REPO / "README.md").read_text()
    assert all(f"notebooks/{name}" in readme for name in PARAMETERS)
    assert "colab.research.google.com/assets/colab-badge.svg" in readme


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_notebooks_are_committed_thin_and_without_outputs(name):
    book = _load(name)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1  # one parameters cell, papermill-style
    for cell in code:  # thin users of the package: no functions or classes of their own
        tree = ast.parse(TransformerManager().transform_cell(cell.source))  # %tensorboard as IPython reads it
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))]
    assert set(PARAMETERS[name]) <= {t.id for n in ast.parse(tagged[0].source).body for t in n.targets}


@pytest.mark.notebooks
@pytest.mark.slow  # a kernel and TensorFlow each, four minutes in all; `make slow` (and CI) runs them
@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_notebook_runs_on_tiny_settings(name, tmp_path):
    from nbclient import NotebookClient

    book = _load(name)
    index = next(i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", []))
    injected = "\n".join(f"{key} = {value!r}" for key, value in PARAMETERS[name].items())
    book.cells.insert(index + 1, nbformat.v4.new_code_cell("# injected by the test\n" + injected))
    (tmp_path / "notebooks").mkdir()
    client = NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path / "notebooks")}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    pictures = [o for o in outputs if "image/png" in o.get("data", {}) or "text/html" in o.get("data", {})]
    if name == "colab_tpu.ipynb":
        assert "No TPU here: running the same code on CPU" in text  # the visible fallback
        assert "'dtype_policy': 'float32'" in text  # the settings the run recorded
    else:
        assert len(pictures) >= EXPECTED_PICTURES[name]
    if name == "06_tuning.ipynb":
        assert "the same weights as the best trial: True" in text
    assert "tensorboard --logdir" in text  # the TensorBoard cell ran, without a server
    assert list((tmp_path / "notebooks" / TENSORBOARD_LOGS[name]).rglob("events.out.tfevents*"))
