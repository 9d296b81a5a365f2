"""Real data and weights files, offline: the CIFAR-10 JPEG folder in ../shared (skipped when it
is absent, as in a user's fresh clone) and local weights files that the tests write."""

import tarfile

import keras
import numpy as np
import pytest
from conftest import SHARED_DATASETS

from kerastune_flow import data, models
from kerastune_flow.errors import WeightsError

CIFAR_TAR = SHARED_DATASETS / "cifar10_jpeg" / "cifar10-jpeg.tar.gz"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def cifar10_folder(tmp_path_factory):
    if not CIFAR_TAR.is_file():
        pytest.skip("no ../shared/datasets/cifar10_jpeg (a fresh clone has none)")
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(root, filter="data")
    return root / "cifar10_jpeg"


@pytest.mark.needs_shared
@pytest.mark.slow  # unpacks and indexes 60,000 JPEGs
def test_the_cifar10_jpeg_folder_loads_with_its_classes_and_counts(cifar10_folder):
    index = data.index_image_folder(cifar10_folder)
    assert index.class_names == CIFAR10_NAMES
    assert len(index.parts["train"]) == 50_000 and len(index.parts["test"]) == 10_000
    splits = data.load_data(str(cifar10_folder), image_size=(32, 32))
    assert splits.sizes == {"train": 45_000, "validation": 5_000, "test": 10_000}
    assert splits.image_shape == (32, 32, 3)
    images, labels = next(iter(data.prepare(splits.test, batch_size=256)))
    assert images.shape == (256, 32, 32, 3)
    assert 2 <= len(np.unique(labels.numpy())) <= 10  # test images mixed, not sorted by class
    assert 0 <= float(images.numpy().min()) and float(images.numpy().max()) <= 255


def test_a_local_notop_weights_file_is_loaded(tmp_path):
    source = models.backbone_base("vgg16", input_shape=(32, 32, 3), weights=None)
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    model = models.build_vgg16_feature_extractor(input_shape=(32, 32, 3), weights=str(path))
    base = models.find_base(model)
    for name in ("block1_conv1", "block5_conv3"):
        np.testing.assert_array_equal(base.get_layer(name).get_weights()[0], source.get_layer(name).get_weights()[0])


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    path = tmp_path / "mobilenet.weights.h5"
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(path)
    with pytest.raises(
        WeightsError, match="is not a vgg16 weights file.*vgg16_weights_tf_dim_ordering_tf_kernels_notop"
    ):
        models.backbone_base("vgg16", input_shape=(32, 32, 3), weights=str(path))


def test_weights_with_the_classifier_top_are_a_clear_error(tmp_path):
    path = tmp_path / "vgg16_top.weights.h5"
    top = keras.applications.VGG16(include_top=True, weights=None, input_shape=(32, 32, 3), classes=2)
    top.save_weights(path)
    with pytest.raises(WeightsError, match=r"holds the classifier top \(include_top=True\)"):
        models.backbone_base("vgg16", input_shape=(32, 32, 3), weights=str(path))
