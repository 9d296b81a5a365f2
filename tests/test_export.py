"""Issue 18: `run export` writes a SavedModel, a LiteRT or an ONNX model that its own runtime runs
like the Keras model (every top-1, within 1e-4; quantized ones measured), at any batch size, and
`evaluate` / `predict` take the export as they take the run. The default tests share one tiny
trained CNN; the full recipe x backbone x format matrix is marked slow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import hide_modules, write_image_folder

from kerastune_flow import run
from kerastune_flow.deploy import artifacts, converters, export
from kerastune_flow.errors import ConfigError, ExportParityError, MissingPackageError, RunDirError
from kerastune_flow.models import BACKBONES
from kerastune_flow.recipes import RECIPES, make_config
from kerastune_flow.training.train import train_and_evaluate

SIZE = 20
PER_CLASS = 20
RUNTIME_MODULES = ("onnxruntime", "tf2onnx", "onnx")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory of the CNN recipe, trained one epoch on 3 classes of 20x20 images."""
    root = tmp_path_factory.mktemp("export")
    images = write_image_folder(root / "images", per_class=PER_CLASS, size=SIZE)
    keras.utils.set_random_seed(0)
    config = make_config("cifar10_cnn", "smoke", data=str(images), image_size=(SIZE, SIZE), epochs=1, verbose=0)
    return train_and_evaluate(config, root / "run").run_dir


@pytest.fixture(scope="module")
def exports(trained) -> dict[str, Path]:
    """Each format exported once through the CLI, in float32: format -> export folder."""
    out = {}
    for format in artifacts.FORMATS:
        assert run.main(["export", str(trained), "--format", format]) == 0
        out[format] = trained / f"export-{format}"
    return out


@pytest.mark.parametrize("format", artifacts.FORMATS)
def test_each_format_writes_its_artifact_labels_and_record(format, exports, trained):
    folder = exports[format]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [artifacts.ARTIFACT_NAMES[format], artifacts.LABELS_TXT, artifacts.EXPORT_JSON]
    )
    assert (folder / artifacts.LABELS_TXT).read_text().splitlines() == ["circle", "square", "triangle"]
    record = json.loads((folder / artifacts.EXPORT_JSON).read_text())
    assert record["format"] == format and record["quantize"] is None
    assert record["input"]["shape"] == [None, SIZE, SIZE, 3] and record["input"]["dtype"] == "float32"
    assert "0..255" in record["input"]["values"] and "logit" in record["output"]["values"]
    assert record["size_bytes"] == artifacts.size_bytes(folder / record["file"]) > 10_000
    parity = record["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] <= export.PARITY_TOLERANCE
    assert parity["examples"] == 6 and parity["batch_sizes"] == [1, 32]
    assert parity["checked_on"].startswith("the test split")
    assert record["training"]["config"]["model"]["recipe"] == "cifar10_cnn"
    assert not list(trained.glob(".export-*"))  # no temporary folder left behind


@pytest.mark.parametrize("format", artifacts.FORMATS)
def test_each_runtime_runs_batch_1_and_32_as_keras_does(format, exports, trained):
    model = keras.saving.load_model(trained / "model.keras", compile=False)
    artifact, _ = artifacts.load_artifact(exports[format])
    images = np.random.default_rng(1).uniform(0, 255, (32, SIZE, SIZE, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(artifact(images, batch_size=32), expected, atol=1e-4)
    np.testing.assert_allclose(artifact(images[:1], batch_size=1), expected[:1], atol=1e-4)
    np.testing.assert_allclose(artifact(images[:7], batch_size=32), expected[:7], atol=1e-4)  # resized again


def test_evaluate_and_predict_take_an_export_with_the_runs_output(exports, trained, capsys):
    image = str(Path(json.loads((trained / "config.json").read_text())["config"]["data"]["data"]) / "square/003.png")
    assert run.main(["evaluate", str(trained)]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert run.main(["predict", str(trained), image, "--json"]) == 0
    expected_rows = json.loads(capsys.readouterr().out)
    for folder in exports.values():
        assert run.main(["evaluate", str(folder)]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert metrics.keys() == expected.keys() and metrics["examples"] == expected["examples"]
        assert metrics["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        assert metrics["loss"] == pytest.approx(expected["loss"], abs=1e-4)
        assert (
            run.main(
                ["predict", str(folder / json.loads((folder / "export.json").read_text())["file"]), image, "--json"]
            )
            == 0
        )
        rows = json.loads(capsys.readouterr().out)
        assert [p["class"] for p in rows[0]["predictions"]] == [p["class"] for p in expected_rows[0]["predictions"]]
        got = [p["probability"] for p in rows[0]["predictions"]]
        assert got == pytest.approx([p["probability"] for p in expected_rows[0]["predictions"]], abs=1e-4)


@pytest.mark.parametrize(("format", "quantize"), [("litert", "int8"), ("onnx", "int8"), ("litert", "float16")])
def test_quantized_exports_state_their_accuracy_drop_and_size(format, quantize, trained, tmp_path):
    record = export.export_model(trained, format=format, quantize=quantize, out=tmp_path / "q")
    parity = record["parity"]
    assert record["quantize"] == quantize and record["parity_rule"] is None
    assert parity["examples"] == 6 and parity["batch_sizes"] == [1, 32]
    assert {"keras_accuracy", "artifact_accuracy", "accuracy_drop_points", "size_ratio", "aims"} <= parity.keys()
    # Weights in int8 take a quarter of float32's bytes (float16: half), plus the graph.
    assert parity["size_ratio"] < (0.35 if quantize == "int8" else 0.6)
    assert parity["top1_agreement"] >= 0.5 and parity["max_abs_diff"] > 0
    if quantize == "int8":
        assert "calibrated on" in record["converter"] or "int8 by" in record["converter"]


def test_a_bare_model_file_is_checked_on_generated_images_and_says_so(trained, tmp_path):
    bare = tmp_path / "cnn.keras"
    bare.write_bytes((trained / "model.keras").read_bytes())
    record = export.export_model(bare, format="litert")
    assert record["out"] == str(tmp_path / "cnn-litert")
    assert record["parity"]["checked_on"].startswith(f"{export.GENERATED_IMAGES} generated images")
    assert "keras_accuracy" not in record["parity"] and record["training"] is None
    with pytest.raises(Exception, match="no training images to calibrate int8"):
        export.export_model(bare, format="litert", quantize="int8")


def test_a_mixed_precision_model_is_exported_in_float32_and_compared_both_ways(tmp_path):
    # --mixed-precision auto trains in bfloat16 on this CPU; as saved, tf2onnx and LiteRT fail on it.
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        inputs = keras.Input((SIZE, SIZE, 3))
        x = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", dtype="float32")(x))
    finally:
        keras.config.set_dtype_policy("float32")
    model.save(tmp_path / "mixed.keras")
    for format in ("litert", "onnx"):
        record = export.export_model(tmp_path / "mixed.keras", format=format)
        assert record["trained_dtype_policy"] == "mixed_bfloat16" and record["compute_dtype"] == "float32"
        assert record["parity"]["max_abs_diff"] <= export.PARITY_TOLERANCE
        assert 0 < record["parity"]["against_trained_model"]["max_abs_diff"] < 0.05


def test_an_existing_out_is_kept_without_overwrite_and_replaced_with_it(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "export.json").write_text("{}")  # an earlier export: only such a folder is replaced
    (out / "model.onnx").write_text("old")
    code = run.main(["export", str(trained), "--format", "litert", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pass --overwrite" in err
    assert (out / "model.onnx").read_text() == "old"
    assert run.main(["export", str(trained), "--format", "litert", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "labels.txt", "model.tflite"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_a_crash_or_a_parity_failure_leaves_nothing_at_out(trained, tmp_path, monkeypatch, capsys):
    def crash(model, path, quantize, calibration):
        path.write_bytes(b"half a flatbuffer")
        raise RuntimeError("killed mid-write")

    monkeypatch.setitem(converters.CONVERTERS, "litert", crash)
    with pytest.raises(RuntimeError, match="killed"):
        export.export_model(trained, format="litert", out=tmp_path / "crashed")
    monkeypatch.undo()
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)  # no artifact can pass: the failure path
    code = run.main(["export", str(trained), "--format", "saved_model", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert re.search(r"disagrees with the Keras model \(top-1 agreement 100.00 %, largest difference", err)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportParityError):
        export.export_model(trained, format="saved_model", out=tmp_path / "bad")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--format", "tflite"], r"argument --format: invalid choice: 'tflite'"),
        (["--format", "saved_model", "--quantize", "int8"], r"SavedModel is exported in float32 only"),
        (["--format", "litert", "--quantize", "int4"], r"argument --quantize: invalid choice"),
    ],
)
def test_bad_choices_are_one_sentence_and_exit_2(argv, match, trained, capsys):
    assert run.main(["export", str(trained), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err)


def test_a_folder_without_a_model_and_a_missing_runtime_are_one_sentence(
    trained, exports, tmp_path, monkeypatch, capsys
):
    (tmp_path / "empty").mkdir()
    assert run.main(["export", str(tmp_path / "empty"), "--format", "onnx"]) == 2
    assert re.search(r"No model at .*model\.keras", capsys.readouterr().err)
    hide_modules(monkeypatch, RUNTIME_MODULES)
    assert run.main(["export", str(trained), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'kerastune_flow[export]'" in err
    assert not (tmp_path / "x").exists()
    image = str(next(trained.parent.glob("images/circle/*.png")))
    assert run.main(["predict", str(exports["onnx"]), image]) == 2
    assert "needs the package onnxruntime" in capsys.readouterr().err
    with pytest.raises(MissingPackageError):
        artifacts.load_artifact(exports["onnx"])


def test_the_api_refuses_what_argparse_would(trained):
    with pytest.raises(ConfigError, match="Unknown export format 'coreml'"):
        export.export_model(trained, format="coreml")
    with pytest.raises(RunDirError, match="not a complete export folder"):
        artifacts.read_export(trained)


# --------------------------------------------------------------------------- the full matrix


def _matrix():
    """Every format of every recipe, and of every backbone once: under the one-stage transfer recipe.
    The staged recipe builds the same model (its base partly trainable, which an export does not
    see), so it runs on its default backbone only: its runs on the other three backbones cost 12 of
    the slow suite's minutes of worker time (test_hub exports fine-tunes of three KerasHub families)."""
    for name, recipe in RECIPES.items():
        backbones = [None]
        if recipe.transfer:
            backbones = list(BACKBONES) if not recipe.staged else [make_config(name, "smoke").model.backbone]
        for backbone in backbones:
            for format in artifacts.FORMATS:
                yield pytest.param(name, backbone, format, id=f"{name}-{backbone or 'own'}-{format}")


@pytest.fixture(scope="module")
def matrix_runs(tmp_path_factory):
    """One smoke run per recipe and backbone, trained when first asked for, in bfloat16 (what
    `--mixed-precision auto` picks on CPUs with native bfloat16): the exports are made from its
    float32 copy. The float32 path is the default tests'."""
    root = tmp_path_factory.mktemp("matrix")
    images = write_image_folder(root / "images", per_class=12, size=32)
    runs = {}

    def get(recipe, backbone):
        if (recipe, backbone) not in runs:
            extra = {"backbone": backbone} if backbone else {}
            config = make_config(
                recipe, "smoke", data=str(images), image_size=(32, 32), verbose=0, mixed_precision="bfloat16", **extra
            )
            runs[recipe, backbone] = train_and_evaluate(config, root / f"{recipe}-{backbone}").run_dir
        return runs[recipe, backbone]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "backbone", "format"), list(_matrix()))
def test_every_recipe_and_backbone_exports_in_every_format(recipe, backbone, format, matrix_runs, tmp_path):
    record = export.export_model(matrix_runs(recipe, backbone), format=format, out=tmp_path / "out")
    assert record["parity"]["top1_agreement"] == 1.0
    assert record["parity"]["max_abs_diff"] <= export.PARITY_TOLERANCE
    assert record["parity"]["batch_sizes"] == [1, 32]
    assert record["trained_dtype_policy"] == "mixed_bfloat16"
