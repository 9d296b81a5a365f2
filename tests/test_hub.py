"""KerasHub backbones (`--backbone hub:NAME` or a preset folder), offline: small random presets of
three families, saved by the tests themselves, as bases of the transfer recipes."""

from __future__ import annotations

import logging
import re

import keras
import numpy as np
import pytest
from conftest import add_callbacks, hide_modules, smoke

from kerastune_flow import models, run, rundir
from kerastune_flow.deploy import export
from kerastune_flow.errors import ConfigError, MissingPackageError, WeightsError
from kerastune_flow.models import hub
from kerastune_flow.recipes import check_image_size
from kerastune_flow.search import tune_space
from kerastune_flow.training import finetune, train

keras_hub = pytest.importorskip("keras_hub")

SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# family -> (the base's name, its default boundary, its block starts) for the presets below
EXPECTED = {
    "resnet": ("hub_resnet", "stack1_block0_pre_activation_bn", ["stack0_block0_pre_activation_bn"]),
    "densenet": ("hub_densenet", "stack2_block1_1_bn", ["stack1_block1_1_bn", "stack1_block2_1_bn"]),
    "vit": ("hub_vit", "transformer_block_2_ln_1", ["transformer_block_1_ln_1"]),
}
FAMILIES = tuple(EXPECTED)


def _backbones():
    """Small random KerasHub backbones and image converters, one per family."""
    imagenet = dict(scale=[1 / 255 / s for s in STD], offset=[-m / s for m, s in zip(MEAN, STD, strict=True)])
    return {
        "resnet": (  # v2 (pre-activation); KerasHub wants 64 filters in the stem and the first stack
            keras_hub.models.ResNetBackbone(
                input_conv_filters=[64],
                input_conv_kernel_sizes=[3],
                stackwise_num_filters=[64, 64],
                stackwise_num_blocks=[1, 1],
                stackwise_num_strides=[1, 2],
                block_type="basic_block",
                use_pre_activation=True,
                image_shape=(SIZE, SIZE, 3),
            ),
            keras_hub.layers.ResNetImageConverter(image_size=(SIZE, SIZE), **imagenet),
        ),
        "densenet": (
            keras_hub.models.DenseNetBackbone(stackwise_num_repeats=[2, 2], growth_rate=8, image_shape=(SIZE, SIZE, 3)),
            keras_hub.layers.DenseNetImageConverter(image_size=(SIZE, SIZE), scale=1 / 255),
        ),
        "vit": (
            keras_hub.models.ViTBackbone(
                image_shape=(SIZE, SIZE, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
            ),
            keras_hub.layers.ViTImageConverter(image_size=(SIZE, SIZE), scale=1 / 127.5, offset=-1.0),
        ),
    }


@pytest.fixture(scope="session")
def presets(tmp_path_factory):
    """family -> (preset folder, the KerasHub backbone, its converter): what `save_to_preset` writes."""
    keras.utils.set_random_seed(3)
    root = tmp_path_factory.mktemp("hub_presets")
    out = {}
    for family, (backbone, converter) in _backbones().items():
        folder = root / family
        backbone.save_to_preset(str(folder))
        converter.save_to_preset(str(folder))
        out[family] = (folder, backbone, converter)
    return out


# --------------------------------------------------------------------------- a preset as a base


@pytest.mark.parametrize("family", FAMILIES)
def test_a_preset_loads_as_a_base_with_its_converter_first_and_its_blocks_named(family, presets):
    folder, backbone, converter = presets[family]
    base, preprocess, record = hub.hub_base(str(folder), input_shape=(SIZE, SIZE, 3))
    name, boundary, first_starts = EXPECTED[family]
    assert (base.name, record.name, models.base_record(base)) == (name, name, record)
    assert isinstance(preprocess, keras.layers.Rescaling) and preprocess.name == f"{name}_preprocess"
    # built-in layers only, but for a ViT's position table (KerasHub's PositionEmbedding)
    kinds = {type(layer).__module__.split(".")[0] for layer in base.layers}
    assert kinds == ({"keras", "keras_hub"} if family == "vit" else {"keras"})
    pixels = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    expected = np.asarray(backbone(converter(pixels)))
    np.testing.assert_allclose(np.asarray(base(preprocess(pixels))), expected, rtol=1e-5, atol=1e-5)
    starts = [base.layers[i].name for i in models.block_starts(base)]
    assert starts[: len(first_starts)] == first_starts and boundary in starts
    assert models.default_unfreeze_at(base) == boundary
    # a fraction snaps to a block start; BatchNormalization and the preprocessing stay frozen
    index = models.unfreeze_from(base, 0.5)
    assert index in models.block_starts(base)
    assert all(not layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))


def test_a_vit_model_pools_its_class_token_both_caches_cut_it_and_it_opens_with_kerashub(
    presets, tmp_path, monkeypatch
):
    model = models.build_transfer_model(backbone=str(presets["vit"][0]), input_shape=(SIZE, SIZE, 3), compile=False)
    names = ["hub_vit_preprocess", "hub_vit", "class_token_output", "flatten"]
    assert [layer.name for layer in model.layers[1:5]] == names
    assert model.get_layer("flatten").output.shape == (None, 32)
    # the feature cache holds the base's tokens; the stage-2 cache the tokens entering the last block
    features, head = finetune.split_at_base(model)
    assert features.output_shape == (None, 17, 32) and head.count_params() + features.count_params() == (
        model.count_params()
    )
    base = models.find_base(model)
    index = models.unfreeze_from(base, models.default_unfreeze_at(base))
    prefix, rest = finetune.split_at_prefix(model, index)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(rest(prefix(pixels)), model(pixels), rtol=1e-5, atol=1e-6)
    assert [w.name for w in rest.trainable_weights][:1] == ["gamma"]  # the last block's first LayerNorm
    model.save(tmp_path / "vit.keras")
    loaded = models.load_keras_model(tmp_path / "vit.keras")
    np.testing.assert_array_equal(loaded(pixels), model(pixels))
    hide_modules(monkeypatch, ["keras_hub"])
    # KerasHub is imported here already, so Keras finds its classes: fail as a process without it would
    monkeypatch.setattr(keras.saving, "load_model", lambda *a, **k: exec("raise TypeError('Could not locate')"))
    with pytest.raises(MissingPackageError, match=r"holds KerasHub layers.*pip install 'kerastune_flow\[hub\]'"):
        models.load_keras_model(tmp_path / "vit.keras")


def test_tune_offers_the_last_blocks_of_a_preset(presets):
    config = smoke("vgg16_finetune", "digits", backbone=str(presets["densenet"][0]))
    assert tune_space.unfreeze_choices(config)[-2:] == ["stack1_block2_1_bn", "stack2_block1_1_bn"]


def test_weights_none_keeps_the_architecture_and_draws_new_weights(presets):
    folder, backbone, _ = presets["densenet"]
    base, _, _ = hub.hub_base(str(folder), input_shape=(48, 48, 3), weights="none")
    assert base.input_shape == (None, 48, 48, 3) and base.count_params() == backbone.count_params()
    assert not np.allclose(base.get_layer("conv1_conv").get_weights()[0], backbone.get_layer("conv1_conv").kernel)
    with pytest.raises(ConfigError, match=r"carries its own weights.*Received: weights=w.h5"):
        hub.hub_base(str(folder), input_shape=(SIZE, SIZE, 3), weights="w.h5")


def test_a_vit_preset_takes_its_own_size_only(presets):
    config = smoke("vgg16_finetune", "digits", backbone=str(presets["vit"][0]), image_size=48)
    with pytest.raises(ConfigError, match=r"takes 32x32 images only.*--image-size 32.*Received: image_size=\(48, 48\)"):
        check_image_size(config)


def test_no_preset_no_network_and_no_keras_hub_each_end_in_one_sentence(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"No KerasHub preset at .*nowhere.*Received: FileNotFoundError"):
        hub.hub_base(str(tmp_path / "nowhere"), input_shape=(SIZE, SIZE, 3))
    with pytest.raises(ConfigError, match=r"backbone must be one of vgg16.*hub:NAME.*Received: backbone='resnet'"):
        smoke("vgg16_features", "digits", backbone="resnet")
    # no network here: KerasHub's download fails, and the message says to use a local preset folder
    with pytest.raises(
        WeightsError, match=r"could not fetch or load the preset resnet_18_imagenet \(no network\?\).*--backbone"
    ):
        hub.hub_base("hub:resnet_18_imagenet", input_shape=(SIZE, SIZE, 3))
    with monkeypatch.context() as m:  # a KerasHub whose ViT differs from what the package rebuilds
        m.setattr(keras_hub, "__version__", "0.21.1")
        with pytest.raises(MissingPackageError, match=r"keras-hub 0.22 or later.*Received: 0.21.1"):
            hub.hub_base("hub:resnet_18_imagenet", input_shape=(SIZE, SIZE, 3))
    hide_modules(monkeypatch, ["keras_hub"])
    with pytest.raises(MissingPackageError, match=r"pip install 'kerastune_flow\[hub\]'"):
        hub.hub_base("hub:resnet_18_imagenet", input_shape=(SIZE, SIZE, 3))
    # the command says so before it reads any data, with exit code 2
    code = run.main(["train", "vgg16_features", "--preset", "smoke", "--backbone", "hub:resnet_18_imagenet"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'kerastune_flow[hub]'" in err and "Traceback" not in err


def test_list_shows_the_kerashub_families(capsys):
    assert run.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("ResNetBackbone", "DenseNetBackbone", "ViTBackbone", "hub:NAME"))


# --------------------------------------------------------------------------- the staged fine-tune, slow


class _KillAtEpoch(keras.callbacks.Callback):
    """Raises KeyboardInterrupt (as a kill would end the process) when epoch `epoch` begins, once."""

    def __init__(self, fired, epoch):
        super().__init__()
        self.fired, self.epoch = fired, epoch

    def on_epoch_begin(self, epoch, logs=None):
        if not self.fired and epoch == self.epoch:
            self.fired.append(epoch)
            raise KeyboardInterrupt


# All three formats for the ResNet, one for the DenseNet, and for the ViT ONNX (its exact GELU's Erfc op,
# which tf2onnx learns from `converters._teach_erfc`) and LiteRT.
EXPORTS = {"resnet": ("saved_model", "litert", "onnx"), "densenet": ("litert",), "vit": ("onnx", "litert")}
# The ViT unfreezes progressively: its last block, then from the epoch after, both blocks.
PROGRESSIVE = {"vit": "0:transformer_block_2_ln_1:1e-4,1:transformer_block_1_ln_1:1e-5"}


@pytest.mark.slow  # 35 to 60 s a family: two stages, a kill and a resume, exports
@pytest.mark.parametrize("family", FAMILIES)
def test_a_fine_tune_on_a_preset_caches_both_stages_resumes_after_a_kill_and_exports(
    family, presets, folder, tmp_path, monkeypatch, caplog
):
    progressive = PROGRESSIVE.get(family)
    config = smoke(
        "vgg16_finetune", folder, backbone=str(presets[family][0]), head_epochs=1, epochs=2, progressive=progressive
    )
    run_dir = tmp_path / "run"
    fired: list[int] = []
    with caplog.at_level(logging.INFO, logger="kerastune_flow"):
        with monkeypatch.context() as m:  # killed as stage 2's second epoch begins (after its first backup)
            add_callbacks(m, _KillAtEpoch(fired, 2))
            with pytest.raises(KeyboardInterrupt):
                train.train_and_evaluate(config, run_dir)
        assert fired == [2] and not (run_dir / rundir.RESULTS_JSON).exists()
        assert "Cached the frozen base features" in caplog.text  # stage 1 trained the head on them
        caplog.clear()
        result = train.train_and_evaluate(config, run_dir)
    assert result.results["resumed"] is True
    # the resumed stage 2 cut the base at its boundary (the default: the last stage or block) and
    # trained on the cached output of the frozen layers below it
    stage, boundary = ("finetune_2", "transformer_block_1_ln_1") if progressive else ("finetune", EXPECTED[family][1])
    assert [r["stage"] for r in rundir.read_history(run_dir)] == ["head", "finetune", stage]
    assert boundary in (run_dir / rundir.CONFIG_JSON).read_text()
    assert re.search(r"Cached the frozen prefix below layer \d+", caplog.text), caplog.text
    assert re.search(rf"Stage {stage}: base layers from \d+ \({boundary}\) unfrozen", caplog.text), caplog.text
    # the saved model opens (a ViT's where KerasHub is installed; the others' are built-in Keras layers
    # only) and exports with parity
    assert models.find_base(keras.saving.load_model(run_dir / rundir.BEST_MODEL)).name == EXPECTED[family][0]
    for format in EXPORTS[family]:
        record = export.export_model(run_dir, format=format, out=tmp_path / format)
        assert record["parity"]["top1_agreement"] == 1.0, record["parity"]
