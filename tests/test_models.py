"""The builders: layer structure, parameter counts, heads and losses, freezing, the knobs."""

import keras
import numpy as np
import pytest

from kerastune_flow import models
from kerastune_flow.errors import ConfigError, WeightsError

SMALL_RGB = (32, 32, 3)

# Reference parameter counts: the from-scratch article's MLP and the TensorFlow CNN tutorial.
MLP_PARAMS = 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10  # 109,386
CNN_PARAMS = 122_570
VGG16_NOTOP_PARAMS = 14_714_688
BLOCK5_PARAMS = 3 * (512 * 512 * 9 + 512)
PREPROCESS_PARAMS = 3 * 3 + 3  # the frozen Dense(3) of VGG16's preprocessing: RGB->BGR, minus the mean


def _dense_units(model):
    return [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)]


def test_scratch_mlp_matches_the_reference():
    model = models.build_scratch_mlp()
    assert model.input_shape == (None, 28, 28, 1)
    assert model.output_shape == (None, 10)
    assert _dense_units(model) == [128, 64, 10]
    assert models.count_params(model) == {"trainable_params": MLP_PARAMS, "total_params": MLP_PARAMS}
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    assert model.layers[-1].activation is keras.activations.linear  # logits


def test_scratch_mlp_normalises_raw_pixels_to_minus_one_one():
    model = models.build_scratch_mlp(compile=False)
    normalize = keras.Model(model.input, model.get_layer("normalize").output)
    pixels = np.zeros((1, 28, 28, 1), "float32")
    pixels[0, 0, :3, 0] = [0.0, 127.5, 255.0]
    out = np.asarray(normalize(pixels))
    np.testing.assert_allclose(out[0, 0, :3, 0], [-1.0, 0.0, 1.0], atol=1e-6)


def test_cifar10_cnn_matches_the_tutorial():
    model = models.build_cifar10_cnn()
    kinds = [type(layer).__name__ for layer in model.layers[2:]]
    assert kinds == ["Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Conv2D", "Flatten", "Dense", "Dense"]
    assert [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)] == [32, 64, 64]
    assert models.count_params(model)["total_params"] == CNN_PARAMS
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    assert model.loss.get_config()["from_logits"] is True


def test_cifar10_cnn_rejects_images_too_small():
    with pytest.raises(ConfigError, match="at least 18x18"):
        models.build_cifar10_cnn(input_shape=(16, 16, 3))


@pytest.mark.parametrize(
    "num_classes, units, activation, loss, label_mode",
    [
        (2, 1, "sigmoid", keras.losses.BinaryCrossentropy, "binary"),
        (5, 5, "softmax", keras.losses.CategoricalCrossentropy, "categorical"),
    ],
)
def test_vgg16_head_follows_the_class_count(num_classes, units, activation, loss, label_mode):
    model = models.build_vgg16_feature_extractor(input_shape=SMALL_RGB, num_classes=num_classes, weights=None)
    assert model.output_shape == (None, units)
    assert model.layers[-1].activation.__name__ == activation
    assert isinstance(model.loss, loss)
    assert models.transfer_head(num_classes).label_mode == label_mode


def test_vgg16_feature_extractor_freezes_the_whole_base():
    model = models.build_vgg16_feature_extractor(input_shape=SMALL_RGB, weights=None)
    base = model.get_layer("vgg16")
    assert not base.trainable
    assert base.count_params() == VGG16_NOTOP_PARAMS
    head = 512 * 256 + 256 + 256 + 1  # Flatten(1x1x512) -> Dense 256 -> Dense 1
    total = VGG16_NOTOP_PARAMS + PREPROCESS_PARAMS + head
    assert models.count_params(model) == {"trainable_params": head, "total_params": total}
    assert [type(layer).__name__ for layer in model.layers[-3:]] == ["Flatten", "Dense", "Dense"]
    assert not model.get_layer("vgg16_preprocess").trainable


def test_vgg16_unfreeze_index_lands_on_block5():
    base = models.backbone_base("vgg16", input_shape=SMALL_RGB, weights=None)
    assert base.layers[models.VGG16_UNFREEZE_AT].name == "block5_conv1"
    assert base.layers[models.VGG16_UNFREEZE_AT - 1].name == "block4_pool"


def test_vgg16_finetune_unfreezes_block5_and_lowers_the_rate():
    stage1 = models.build_vgg16_feature_extractor(input_shape=SMALL_RGB, weights=None)
    head_trainable = models.count_params(stage1)["trainable_params"]
    model = models.build_vgg16_finetune(model=stage1)
    base = model.get_layer("vgg16")
    trainable = [layer.name for layer in base.layers if layer.trainable and layer.weights]
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert all(not layer.trainable for layer in base.layers[: models.VGG16_UNFREEZE_AT])
    assert models.count_params(model)["trainable_params"] == head_trainable + BLOCK5_PARAMS
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-5)


def test_finetune_trains_only_the_unfrozen_layers():
    model = models.build_vgg16_finetune(input_shape=SMALL_RGB, weights=None, learning_rate=1e-2)
    base = model.get_layer("vgg16")
    frozen_before = base.get_layer("block4_conv3").get_weights()[0].copy()
    open_before = base.get_layer("block5_conv3").get_weights()[0].copy()
    x = np.random.default_rng(0).uniform(0, 255, (8, *SMALL_RGB)).astype("float32")
    y = np.array([0, 1] * 4, dtype="float32").reshape(-1, 1)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    np.testing.assert_array_equal(base.get_layer("block4_conv3").get_weights()[0], frozen_before)
    assert not np.allclose(base.get_layer("block5_conv3").get_weights()[0], open_before)


# 0.5 of VGG16's 19 layers is layer 10 (block3_pool): snapped to block4_conv1 (11).
@pytest.mark.parametrize("value, expected", [(15, 15), ("15", 15), ("block5_conv1", 15), (0.5, 11), ("1.0", 19)])
def test_unfreeze_at_accepts_index_name_and_fraction(value, expected):
    base = models.backbone_base("vgg16", input_shape=SMALL_RGB, weights=None)
    assert models.resolve_unfreeze_at(base, value) == expected


@pytest.mark.parametrize(
    "backbone, fraction, layer",
    [
        ("resnet50", 0.3, "conv3_block3_1_conv"),  # 0.3 x 175 = layer 52, inside conv3_block2
        pytest.param("resnet50", 0.9, "conv5_block3_1_conv", marks=pytest.mark.slow),  # each backbone once by default
        ("mobilenetv2", 0.3, "block_6_expand"),
        ("efficientnetb0", 0.3, "block4a_expand_conv"),
        pytest.param("efficientnetb0", 0.9, "block7a_expand_conv", marks=pytest.mark.slow),
    ],
)
def test_a_fraction_never_cuts_a_block_in_half(backbone, fraction, layer):
    base = models.backbone_base(backbone, input_shape=SMALL_RGB, weights=None)
    index = models.resolve_unfreeze_at(base, fraction)

    assert base.layers[index].name == layer
    starts = models.block_starts(base)
    assert index in starts
    asked = round(len(base.layers) * fraction)
    assert index >= asked and not [s for s in starts if asked <= s < index]  # the nearest at or after
    assert models.describe_layer(base, index) == f"{index} ({layer})"


def test_a_users_base_snaps_to_layers_with_weights():
    inputs = keras.Input(SMALL_RGB)
    x = keras.layers.Conv2D(4, 3, name="conv_1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool_1")(x)
    x = keras.layers.Conv2D(4, 3, name="conv_2")(x)
    base = keras.Model(inputs, keras.layers.Flatten(name="flat")(x), name="base")

    assert models.block_starts(base) == [1, 3]
    assert base.layers[models.resolve_unfreeze_at(base, 0.4)].name == "conv_2"  # 0.4 x 5 = 2, the pooling


@pytest.mark.parametrize("value, match", [(19, "from 0 to 18"), ("block9_conv1", "no layer named"), (1.5, r"\[0, 1\]")])
def test_unfreeze_at_out_of_range_is_a_clear_error(value, match):
    base = models.backbone_base("vgg16", input_shape=SMALL_RGB, weights=None)
    with pytest.raises(ConfigError, match=match):
        models.resolve_unfreeze_at(base, value)


def test_batchnorm_layers_stay_frozen_when_unfreezing():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv_a")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(4, 3, name="conv_b")(x)
    base = keras.Model(inputs, x)
    models.unfreeze_from(base, 1)
    assert base.get_layer("conv_a").trainable and base.get_layer("conv_b").trainable
    assert not base.get_layer("bn").trainable


def test_vgg16_preprocessing_matches_keras_applications():
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    ours = models.ImagenetPreprocessing("caffe")(x)
    reference = keras.applications.vgg16.preprocess_input(x.copy())
    np.testing.assert_allclose(np.asarray(ours), reference, rtol=1e-5, atol=1e-4)


def test_vgg16_rejects_small_or_gray_inputs():
    with pytest.raises(ConfigError, match="at least 32x32"):
        models.backbone_base("vgg16", input_shape=(28, 28, 3), weights=None)
    with pytest.raises(ConfigError, match="RGB"):
        models.backbone_base("vgg16", input_shape=(32, 32, 1), weights=None)


def test_vgg16_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        models.backbone_base("vgg16", input_shape=SMALL_RGB, weights=str(tmp_path / "nope.h5"))


def test_vgg16_imagenet_without_network_names_the_file(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(keras.applications, "VGG16", offline)
    with pytest.raises(WeightsError, match=models.VGG16_NOTOP_FILE) as info:
        models.backbone_base("vgg16", input_shape=SMALL_RGB, weights="imagenet")
    assert "58,889,256 bytes" in str(info.value) and ".keras" in str(info.value)


def test_vgg16_loads_a_local_weights_file(tmp_path):
    source = models.backbone_base("vgg16", input_shape=SMALL_RGB, weights=None)
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    model = models.build_vgg16_feature_extractor(input_shape=SMALL_RGB, weights=str(path))
    np.testing.assert_array_equal(
        model.get_layer("vgg16").get_layer("block1_conv1").get_weights()[0],
        source.get_layer("block1_conv1").get_weights()[0],
    )


def test_knobs_reach_the_layers():
    model = models.build_cifar10_cnn(
        kernel_initializer="he_normal", dropout=0.3, l2=1e-3, optimizer="sgd", learning_rate=0.05
    )
    assert isinstance(model.get_layer("conv_1").kernel_initializer, keras.initializers.HeNormal)
    assert model.get_layer("dropout").rate == pytest.approx(0.3)
    assert model.get_layer("dense").kernel_regularizer.get_config()["l2"] == pytest.approx(1e-3)
    model(np.zeros((1, 32, 32, 3), "float32"))
    assert len(model.losses) == 5  # one penalty per kernel: three convolutions, two dense layers
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert float(model.optimizer.momentum) == pytest.approx(0.9)
    mlp = models.build_scratch_mlp(dropout=0.2, l1=1e-4, optimizer="rmsprop")
    assert [layer.name for layer in mlp.layers if isinstance(layer, keras.layers.Dropout)] == ["dropout_1", "dropout_2"]
    assert isinstance(mlp.optimizer, keras.optimizers.RMSprop)


@pytest.mark.parametrize(
    "name, cls", [("adam", "Adam"), ("sgd", "SGD"), ("rmsprop", "RMSprop"), ("adagrad", "Adagrad")]
)
def test_make_optimizer(name, cls):
    optimizer = models.make_optimizer(name, 0.01)
    assert type(optimizer).__name__ == cls
    assert float(optimizer.learning_rate) == pytest.approx(0.01)


def test_bad_optimizer_and_class_counts_are_clear_errors():
    with pytest.raises(ConfigError, match="Unknown optimizer"):
        models.make_optimizer("lamb")
    with pytest.raises(ConfigError, match="positive"):
        models.make_optimizer("adam", 0.0)
    with pytest.raises(ConfigError, match="at least two classes"):
        models.build_scratch_mlp(num_classes=1)


def test_saved_model_round_trip_keeps_predictions(tmp_path):
    model = models.build_vgg16_feature_extractor(input_shape=SMALL_RGB, weights=None, num_classes=3)
    x = np.random.default_rng(2).uniform(0, 255, (2, *SMALL_RGB)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5)
