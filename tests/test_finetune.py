"""Transfer learning: backbones, the user's own base, feature caching, progressive unfreezing,
discriminative learning rates, BatchNorm kept in inference mode, and resuming between stages."""

import logging
import shutil

import keras
import numpy as np
import pytest
from conftest import add_callbacks, smoke

from kerastune_flow import models, rundir
from kerastune_flow.errors import ConfigError, RunDirError
from kerastune_flow.training import finetune, train

SMALL_RGB = (32, 32, 3)


class _Probe(keras.callbacks.Callback):
    """Records, per fit, a copy of chosen weights at the start and the end."""

    def __init__(self, pick):
        super().__init__()
        self.pick = pick
        self.begin, self.end = [], []

    def _weights(self):
        if not any(isinstance(layer, keras.Model) for layer in self.model.layers):
            return None  # the head trained on cached features: no base inside
        return [np.array(w) for w in self.pick(self.model)]

    def on_train_begin(self, logs=None):
        self.begin.append(self._weights())

    def on_train_end(self, logs=None):
        self.end.append(self._weights())


# --------------------------------------------------------------------------- backbones


@pytest.mark.parametrize(
    "name, preprocess",
    [
        ("resnet50", keras.applications.resnet50.preprocess_input),
        ("mobilenetv2", keras.applications.mobilenet_v2.preprocess_input),
        ("efficientnetb0", keras.applications.efficientnet.preprocess_input),
    ],
)
def test_other_backbones_build_with_their_own_preprocessing(name, preprocess):
    model = models.build_transfer_model(backbone=name, input_shape=SMALL_RGB, num_classes=3, weights=None)
    base = models.find_base(model)
    assert base.name == name and not base.trainable
    assert model.get_layer("pool").__class__.__name__ == "GlobalAveragePooling2D"
    x = np.random.default_rng(0).uniform(0, 255, (2, *SMALL_RGB)).astype("float32")
    layer = next((lay for lay in model.layers if models.is_preprocessing(lay)), None)
    ours = np.asarray(layer(x)) if layer is not None else x
    np.testing.assert_allclose(ours, preprocess(x.copy()), rtol=1e-5, atol=1e-4)
    boundary = models.resolve_unfreeze_at(base, models.default_unfreeze_at(base))
    assert base.layers[boundary].name == models.BACKBONES[name].unfreeze_at


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="vgg16, resnet50, mobilenetv2, efficientnetb0"):
        models.build_transfer_model(backbone="alexnet", input_shape=SMALL_RGB, weights=None)


@pytest.mark.slow  # 12 s, a whole run; tests/test_models.py checks BatchNorm stays frozen on the built model
def test_mobilenetv2_keeps_its_batchnorm_frozen_when_unfrozen(image_folder, tmp_path, monkeypatch, caplog):
    def pick(model):
        return [models.find_base(model).get_layer("block_16_expand_BN").moving_mean]

    probe = _Probe(pick)
    add_callbacks(monkeypatch, probe)
    # 0.9 of MobileNetV2's 154 layers is layer 139, inside block 15: snapped to block 16's first layer.
    config = smoke("vgg16_finetune", image_folder, backbone="mobilenetv2", head_epochs=1, epochs=1, unfreeze_at="0.9")
    with caplog.at_level(logging.INFO, logger="kerastune_flow"):
        result = train.train_and_evaluate(config, tmp_path / "run")
    base = models.find_base(result.model)
    assert base.get_layer("block_16_expand").trainable and not base.get_layer("block_16_expand_BN").trainable
    assert not base.get_layer("block_15_project").trainable
    np.testing.assert_array_equal(probe.end[-1][0], probe.begin[-1][0])
    meta = rundir.read_json(tmp_path / "run" / rundir.CONFIG_JSON)
    assert meta["unfreeze"] == [
        {"stage": "finetune", "at": "0.9", "index": 143, "layer": "block_16_expand", "lr": 1e-5}
    ]
    assert "base layers from 143 (block_16_expand) unfrozen" in caplog.text


def _bn_base(path):
    """A small conv net with BatchNormalization, trained a little so its statistics are not the
    initial zeros and ones, saved as a .keras file."""
    inputs = keras.Input(SMALL_RGB)
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, name="conv_1")(x)
    x = keras.layers.BatchNormalization(name="bn_1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, name="conv_top")(x)
    x = keras.layers.BatchNormalization(name="bn_top")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, outputs)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(6)
    model.fit(rng.uniform(0, 255, (16, *SMALL_RGB)), rng.integers(0, 3, 16), epochs=1, verbose=0)
    model.save(path)
    return path


def test_batchnorm_statistics_do_not_move_while_the_block_learns(image_folder, tmp_path, monkeypatch):
    """base(x, training=False) and frozen BN layers: in stage 2 the unfrozen convolution learns
    while the moving statistics of the BatchNormalization after it stay exactly as they were."""
    path = _bn_base(tmp_path / "bn_base.keras")
    assert not np.allclose(np.array(keras.saving.load_model(path).get_layer("bn_top").moving_mean), 0.0)

    def pick(model):
        base = models.find_base(model)
        return [
            base.get_layer("bn_top").moving_mean,
            base.get_layer("bn_top").moving_variance,
            base.get_layer("conv_top").kernel,
        ]

    probe = _Probe(pick)
    add_callbacks(monkeypatch, probe)
    config = smoke(
        "vgg16_finetune",
        image_folder,
        base=str(path),
        base_output="gap",
        unfreeze_at="conv_top",
        head_epochs=1,
        epochs=2,
        finetune_learning_rate=1e-2,
    )
    result = train.train_and_evaluate(config, tmp_path / "run")
    base = models.find_base(result.model)
    assert base.get_layer("conv_top").trainable and not base.get_layer("bn_top").trainable
    (mean0, var0, kernel0), (mean1, var1, kernel1) = probe.begin[-1], probe.end[-1]
    np.testing.assert_array_equal(mean1, mean0)
    np.testing.assert_array_equal(var1, var0)
    assert np.abs(kernel1 - kernel0).max() > 1e-4


# --------------------------------------------------------------------------- the user's own base


def _pretrained_cnn_run(image_folder, tmp_path):
    train.train_and_evaluate(smoke("cifar10_cnn", image_folder, epochs=2), tmp_path / "source")
    return tmp_path / "source"


@pytest.mark.slow  # 11 s; every default fine-tune test already fine-tunes a trained CNN run (conftest's base_model)
def test_a_full_training_run_becomes_the_base_of_a_fine_tune(image_folder, tmp_path, monkeypatch):
    source = _pretrained_cnn_run(image_folder, tmp_path)
    saved = keras.saving.load_model(source / "model.keras")
    probe = _Probe(lambda m: [models.find_base(m).get_layer("conv_3").kernel])
    add_callbacks(monkeypatch, probe)
    config = smoke("vgg16_finetune", image_folder, base=str(source), base_output="dense", head_epochs=1, epochs=1)
    result = train.train_and_evaluate(config, tmp_path / "transfer")

    base = models.find_base(result.model)
    assert base.name == models.CUSTOM_BASE_NAME and base.layers[-1].name == "dense"
    np.testing.assert_array_equal(probe.begin[-1][0], saved.get_layer("conv_3").get_weights()[0])  # pre-trained
    # default boundary for a user's base: its last two weighted layers (conv_3 and dense) train
    assert [layer.name for layer in base.layers if layer.trainable and layer.weights] == ["conv_3", "dense"]
    assert result.results["stage_boundaries"] == [1]


def test_base_output_must_be_a_layer_of_the_base(base_model, tmp_path):
    source = tmp_path / "source"  # a run directory, as `train` leaves it: its model.keras is the base
    source.mkdir()
    shutil.copy(base_model, source / "model.keras")
    assert models.cut_base(source, "dense").layers[-1].name == "dense"
    with pytest.raises(ConfigError, match="no layer named 'fc9'.*conv_1"):
        models.cut_base(source, "fc9")
    with pytest.raises(RunDirError, match="No saved model"):
        models.cut_base(tmp_path / "nothing.keras")


# --------------------------------------------------------------------------- feature caching


def test_cached_features_train_the_same_head_as_the_full_forward_pass(image_folder, tmp_path):
    cached = train.train_and_evaluate(smoke("vgg16_features", image_folder, epochs=2), tmp_path / "cached")
    full = train.train_and_evaluate(
        smoke("vgg16_features", image_folder, epochs=2, feature_cache="off"), tmp_path / "full"
    )
    for name in ("dense", "predictions"):
        np.testing.assert_allclose(
            cached.model.get_layer(name).get_weights()[0], full.model.get_layer(name).get_weights()[0], atol=1e-5
        )
    assert [r["val_accuracy"] for r in cached.history] == pytest.approx([r["val_accuracy"] for r in full.history])


def test_a_head_trained_on_features_is_the_full_models_head(image_folder):
    model = models.build_vgg16_feature_extractor(input_shape=SMALL_RGB, weights=None, num_classes=3)
    features, head = finetune.split_at_base(model)
    x = np.random.default_rng(3).uniform(0, 255, (4, *SMALL_RGB)).astype("float32")
    np.testing.assert_allclose(head(features(x)), model(x), atol=1e-6)
    head.get_layer("predictions").kernel.assign(np.ones(head.get_layer("predictions").kernel.shape))
    np.testing.assert_array_equal(model.get_layer("predictions").get_weights()[0], 1.0)  # shared, not copied


def test_the_best_model_saved_from_cached_training_is_the_full_model(image_folder, tmp_path):
    result = train.train_and_evaluate(smoke("vgg16_features", image_folder), tmp_path / "run")
    saved = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert saved.input_shape == (None, *SMALL_RGB)
    assert models.find_base(saved).name == "vgg16"
    x = np.random.default_rng(4).uniform(0, 255, (2, *SMALL_RGB)).astype("float32")
    np.testing.assert_allclose(saved.predict(x, verbose=0), result.model.predict(x, verbose=0), atol=1e-6)


@pytest.mark.slow  # 6 s; the default suite's augmented runs (test_augment) and cached runs stay
def test_augmentation_falls_back_to_the_full_pass_and_says_so(image_folder, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kerastune_flow"):
        config = smoke("vgg16_features", image_folder, augment=("flip",), augment_views=0)  # 0: no view cache
        train.train_and_evaluate(config, tmp_path / "run")
    assert "full forward pass (no feature cache)" in caplog.text
    assert "Cached the frozen base's features" not in caplog.text


# --------------------------------------------------------------------------- progressive unfreezing


@pytest.mark.slow  # three stages; tests/test_caches.py runs a progressive fine-tune on the cached prefix
def test_progressive_unfreezing_recompiles_at_each_step(image_folder, tmp_path):
    config = smoke(
        "vgg16_finetune",
        image_folder,
        head_epochs=1,
        epochs=3,
        patience=10,
        progressive="0:block5_conv1:1e-4,2:block4_conv1:1e-5",
    )
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert [r["stage"] for r in result.history] == ["head", "finetune", "finetune", "finetune_2"]
    assert [r["learning_rate"] for r in result.history] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5])
    assert result.results["stage_boundaries"] == [1, 3]
    base = models.find_base(result.model)
    assert base.get_layer("block4_conv1").trainable and not base.get_layer("block3_conv3").trainable


@pytest.mark.parametrize(
    "spec, match",
    [("1:block5_conv1:1e-5", "start at epoch 0"), ("0:block5_conv1", "EPOCH:UNFREEZE_AT:LR"), ("0:15:-1", "EPOCH")],
)
def test_progressive_spec_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        finetune.parse_progressive(spec)


def test_progressive_spec_parses():
    assert finetune.parse_progressive("0:15:1e-5, 3:0.5:1e-6") == [
        finetune.FinetuneStep(0, "15", 1e-5),
        finetune.FinetuneStep(3, "0.5", 1e-6),
    ]
    assert finetune.parse_progressive(None) == []


# --------------------------------------------------------------------------- discriminative rates


def _one_sgd_step(base_multiplier):
    keras.utils.set_random_seed(0)
    model = models.build_vgg16_feature_extractor(input_shape=SMALL_RGB, weights=None, compile=False)
    models.unfreeze_from(models.find_base(model), models.VGG16_UNFREEZE_AT)
    models.compile_model(
        model,
        models.transfer_head(2),
        optimizer="sgd",
        learning_rate=1e-3,
        base_variables=models.find_base(model).trainable_variables,
        base_multiplier=base_multiplier,
    )
    base_kernel = models.find_base(model).get_layer("block5_conv3").kernel
    head_kernel = model.get_layer("predictions").kernel
    before = np.array(base_kernel), np.array(head_kernel)
    x = np.random.default_rng(5).uniform(0, 255, (4, *SMALL_RGB)).astype("float32")
    y = np.array([[0.0], [1.0], [0.0], [1.0]], "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    return np.array(base_kernel) - before[0], np.array(head_kernel) - before[1], model


def test_discriminative_rates_scale_only_the_base_updates(tmp_path):
    base_full, head_full, _ = _one_sgd_step(None)
    base_scaled, head_scaled, model = _one_sgd_step(0.25)
    assert np.abs(base_full).max() > 0
    np.testing.assert_allclose(base_scaled, 0.25 * base_full, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(head_scaled, head_full, rtol=1e-4, atol=1e-9)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer).__name__ == "DiscriminativeSGD"
    assert loaded.optimizer.base_multiplier == 0.25


@pytest.mark.slow  # a whole staged run (8 s); the default suite checks the rates on the optimizer's updates
def test_finetune_with_discriminative_rates_end_to_end(image_folder, tmp_path):
    config = smoke("vgg16_finetune", image_folder, head_epochs=1, epochs=1, base_lr_multiplier=0.1)
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert type(result.model.optimizer).__name__ == "DiscriminativeAdam"
    assert (tmp_path / "run" / "model.keras").exists()


@pytest.mark.slow  # 27 s; the default suite resumes a fine-tune killed in each stage (test_exact_resume)
def test_a_run_killed_after_its_last_stage_resumes_without_fitting_again(image_folder, tmp_path, monkeypatch):
    config = smoke("vgg16_finetune", image_folder, seed=3)
    whole = train.train_and_evaluate(config, tmp_path / "whole")
    with monkeypatch.context() as m:  # killed after both stages were recorded, before the results
        m.setattr(train, "weights_digest", lambda model: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, tmp_path / "run")
    fits = []
    original = keras.Model.fit
    monkeypatch.setattr(keras.Model, "fit", lambda self, *a, **k: fits.append(self.name) or original(self, *a, **k))
    resumed = train.train_and_evaluate(config, tmp_path / "run")
    assert fits == []  # both stages come from the stage ledger
    assert resumed.results["resumed"] is True
    assert resumed.results["weights_sha256"] == whole.results["weights_sha256"]
    assert float(resumed.model.optimizer.learning_rate) == pytest.approx(config.model.finetune_learning_rate)
