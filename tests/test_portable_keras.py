"""A saved model.keras opens in plain Keras: `keras.saving.load_model(path)`, safe mode and compile
config included, in a process that never imports kerastune_flow, and predicts what the package's
loader predicts. Every recipe, on every backbone at its smallest size; the backbones'
preprocessing equals `keras.applications`' `preprocess_input`.

The plain-Keras side runs in one subprocess per group of files (each TensorFlow start costs seconds).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerastune_flow import models, rundir
from kerastune_flow.data import EpochClock
from kerastune_flow.recipes import RECIPES, make_config
from kerastune_flow.runtime.device import device_settings, dtype_policy
from kerastune_flow.training import finetune, fitting, train
from kerastune_flow.training.fitting import FitContext

NUM_CLASSES = 3
BATCH = 2
ATOL = 1e-5
# Every backbone's own preprocessing, which the package's layers must equal.
REFERENCE_PREPROCESS = {
    "vgg16": keras.applications.vgg16.preprocess_input,
    "resnet50": keras.applications.resnet50.preprocess_input,
    "mobilenetv2": keras.applications.mobilenet_v2.preprocess_input,
    "efficientnetb0": keras.applications.efficientnet.preprocess_input,
}
OLD_LAYER = "old_imagenet_preprocessing"  # saved by kerastune_flow 0.1.0: plain Keras must refuse it

# Runs with plain Keras only; argv[1] is a JSON file {name: [model.keras, batch.npy, out.npy]}.
PLAIN_KERAS = """
import json, sys
import numpy as np
import keras

jobs = json.load(open(sys.argv[1]))
report = {}
for name, (model_path, batch_path, out_path) in jobs.items():
    try:
        model = keras.saving.load_model(model_path)
    except Exception as error:
        report[name] = {"error": type(error).__name__ + ": " + " ".join(str(error).split())[:300]}
        continue
    np.save(out_path, np.asarray(model(np.load(batch_path), training=False), dtype="float32"))
    report[name] = {"compiled": model.compiled, "optimizer": type(getattr(model, "optimizer", None)).__name__}
report["modules"] = sorted({m.split(".")[0] for m in sys.modules if m.startswith("kerastune")})
assert "kerastune_flow" not in sys.modules
print(json.dumps(report))
"""


def run_plain_keras(jobs: dict[str, list[str]], folder: Path) -> dict:
    """Loads every file of `jobs` in one fresh Python process that imports Keras and nothing of ours."""
    spec = folder / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_KERAS, str(spec)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("modules") == []
    return report


def _case_config(recipe, backbone=None, base=None, **overrides):
    """A config of `recipe` as a smoke run would have it; a staged one with the settings whose
    objects end in the compile config: a cosine schedule and discriminative rates."""
    extra = dict(lr_schedule="cosine", base_lr_multiplier=0.1) if RECIPES[recipe].staged else {}
    if base is not None:
        extra.update(base=str(base), base_output="dense")
    elif backbone is not None:
        extra.update(backbone=backbone)
    return make_config(recipe, "smoke", data="unused", **{**extra, **overrides})


# The default suite's staged backbones: one of each preprocessing that is a layer of the model (caffe's
# frozen Dense, tf's Rescaling); ResNet50 (caffe again) and EfficientNetB0 (which scales inside itself)
# take 25-35 s more to build and save, and the slow real-run check below covers every backbone.
QUICK_BACKBONES = ("vgg16", "mobilenetv2")


def _cases(base_model: Path, *, backbones: tuple[str, ...] = tuple(models.BACKBONES)) -> dict[str, dict]:
    """The config of each recipe; a transfer recipe on the user's own base too, and a staged one
    on each of `backbones` and once more under float16 (a loss-scale optimizer). The one-stage transfer
    recipe builds the same model as the staged one, without stage two's compile config: it runs on
    its default backbone only."""
    cases = {}
    for name, recipe in RECIPES.items():
        if not recipe.transfer:
            cases[name] = _case_config(name)
            continue
        default = make_config(name, "smoke").model.backbone
        for backbone in backbones if recipe.staged else [default]:
            cases[f"{name}-{backbone}"] = _case_config(name, backbone)
        cases[f"{name}-base"] = _case_config(name, base=base_model)
        if recipe.staged:
            cases[f"{name}-base-float16"] = _case_config(name, base=base_model, mixed_precision="float16")
    return cases


def _build_and_save(config, path: Path) -> keras.Model:
    """The recipe's model built, compiled (a staged recipe: for its second stage) and saved as the
    package builds, compiles and saves it, with its optimizer state created as a fit creates it."""
    settings = device_settings("cpu", mixed_precision=config.train.mixed_precision)
    with dtype_policy(settings.dtype_policy):
        recipe = RECIPES[config.model.recipe]
        context = FitContext(
            config=config,
            run_dir=path.parent,
            strategy=tf.distribute.get_strategy(),
            settings=settings,
            steps_per_epoch=2,
            clock=EpochClock(),
            epochs=2,
        )
        base = train.load_base(config)
        size = base.input_shape[1] if base is not None else recipe.min_size(config.model.backbone)
        model = train.build_model(context, input_shape=(size, size, 3), num_classes=NUM_CLASSES, base=base)
        if recipe.staged:
            step = finetune.finetune_steps(config, models.find_base(model))[0]
            finetune.compile_finetune_step(model, context, step, rate=step.learning_rate, epochs=1)
        else:  # built uncompiled: each stage compiles what it fits, once its rate is known
            fitting.compile_for(model, context, learning_rate=config.model.learning_rate, epochs=1)
        model.optimizer.build(model.trainable_variables)
        rundir.atomic_save_model(model, path)
    return model


def _old_layer_model(mode: str = "caffe") -> keras.Model:
    """A small model on the package's former preprocessing layer."""
    inputs = keras.Input((8, 8, 3))
    x = models.ImagenetPreprocessing(mode, name="base_preprocess")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, name="predictions")(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def _batch(model: keras.Model, seed: int = 0) -> np.ndarray:
    shape = (BATCH, *model.input_shape[1:])
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


def _job(folder: Path, model: keras.Model) -> list[str]:
    """What the plain-Keras process is given for one saved model: its file, a batch, where to put
    the predictions."""
    np.save(folder / "batch.npy", _batch(model))
    return [str(folder / rundir.BEST_MODEL), str(folder / "batch.npy"), str(folder / "plain.npy")]


def _check_report(report: dict, ours: dict[str, np.ndarray], folder: Path) -> None:
    failed = {name: r["error"] for name, r in report.items() if "error" in r}
    assert not failed
    for name, r in report.items():
        assert r["compiled"] and r["optimizer"] in ("Adam", "LossScaleOptimizer"), (name, r)
        np.testing.assert_allclose(np.load(folder / name / "plain.npy"), ours[name], rtol=0, atol=ATOL, err_msg=name)


def test_plain_keras_loads_every_recipes_model(base_model, tmp_path):
    jobs, ours = {}, {}
    # vgg16_features-vgg16 saves the model vgg16_finetune-vgg16 saves, less stage 2's compile (5 s)
    cases = {k: v for k, v in _cases(base_model, backbones=QUICK_BACKBONES).items() if k != "vgg16_features-vgg16"}
    for name, config in cases.items():
        (tmp_path / name).mkdir()
        _build_and_save(config, tmp_path / name / rundir.BEST_MODEL)
        loaded = models.load_keras_model(tmp_path / name / rundir.BEST_MODEL)
        jobs[name] = _job(tmp_path / name, loaded)
        ours[name] = np.asarray(loaded(np.load(jobs[name][1]), training=False), dtype="float32")
        keras.backend.clear_session(free_memory=False)
    # The check can fail: plain Keras refuses the package's former layer.
    (tmp_path / OLD_LAYER).mkdir()
    old = _old_layer_model()
    old.save(tmp_path / OLD_LAYER / rundir.BEST_MODEL)
    jobs[OLD_LAYER] = _job(tmp_path / OLD_LAYER, old)

    report = run_plain_keras(jobs, tmp_path)

    assert "could not be deserialized" in report.pop(OLD_LAYER).get("error", "")
    _check_report(report, ours, tmp_path)


@pytest.mark.parametrize("backbone", list(models.BACKBONES))
def test_preprocessing_equals_keras_applications(backbone):
    assert set(REFERENCE_PREPROCESS) == set(models.BACKBONES)  # a new backbone needs its reference here
    layer = models.preprocessing_layer(models.BACKBONES[backbone].preprocessing, name=f"{backbone}_preprocess")
    rng = np.random.default_rng(3)
    pixels = rng.uniform(0, 255, (4, 8, 8, 3)).astype("float32")
    whole = rng.integers(0, 256, (4, 8, 8, 3)).astype("uint8")
    for x in (pixels, whole):
        reference = REFERENCE_PREPROCESS[backbone](x.astype("float32"))
        if layer is None:  # the model rescales inside itself
            np.testing.assert_array_equal(reference, x.astype("float32"))
            continue
        inputs = keras.Input((8, 8, 3))
        ours = keras.Model(inputs, layer(inputs))(x)
        np.testing.assert_allclose(np.asarray(ours), reference, rtol=0, atol=1e-6)  # 1 ulp: x / 127.5 - 1
    assert layer is None or not layer.trainable_weights


def test_preprocessing_stays_frozen_when_a_cut_transfer_model_is_unfrozen():
    transfer = models.build_transfer_model(backbone="vgg16", input_shape=(32, 32, 3), weights=None, compile=False)
    # what `cut_base` makes of a saved transfer run: the preprocessing is inside the user's base
    base = keras.Model(transfer.inputs, transfer.get_layer("dense").output, name=models.CUSTOM_BASE_NAME)
    preprocess = base.get_layer("vgg16_preprocess")
    assert base.layers.index(preprocess) not in models.block_starts(base)
    models.unfreeze_from(base, 0)
    assert not preprocess.trainable and base.get_layer("dense").trainable
    assert models.count_params(base)["trainable_params"] == models.count_params(base)["total_params"] - 3 * 3 - 3


@pytest.mark.parametrize("mode", models.backbones.PREPROCESSING_MODES)
def test_files_with_the_old_preprocessing_layer_still_load_through_the_package(mode, tmp_path):
    model = _old_layer_model(mode)
    path = tmp_path / "old.keras"
    model.save(path)
    loaded = models.load_keras_model(path)
    assert isinstance(loaded.get_layer("base_preprocess"), models.ImagenetPreprocessing)
    x = _batch(model)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=0, atol=ATOL)


@pytest.mark.slow
def test_plain_keras_loads_the_model_of_every_real_run(image_folder, base_model, tmp_path):
    """Real smoke runs of every recipe, the staged one on every backbone (the one-stage transfer
    recipe builds the same model: on its default backbone only, which saved three runs)."""
    jobs, ours = {}, {}
    for name, config in _cases(base_model).items():
        train.train_and_evaluate(config.replace(data=str(image_folder)), tmp_path / name)
        loaded = models.load_keras_model(tmp_path / name / rundir.BEST_MODEL)
        jobs[name] = _job(tmp_path / name, loaded)
        ours[name] = np.asarray(loaded(np.load(jobs[name][1]), training=False), dtype="float32")
    _check_report(run_plain_keras(jobs, tmp_path), ours, tmp_path)
