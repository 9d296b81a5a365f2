"""Tests for kerastune_flow.data: image folders, tfds under tfds.testing.mock_data, the tail."""

from __future__ import annotations

import collections
import re
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from conftest import IMAGES_PER_CLASS, NUM_CLASSES, SHARED_DATASETS, write_image_folder, write_tfds_metadata

from kerastune_flow import data
from kerastune_flow.errors import DataError

NUM_IMAGES = NUM_CLASSES * IMAGES_PER_CLASS  # 36 in the `image_folder` fixture
IMAGE_SIZE = (16, 16)
NUM_MOCK_EXAMPLES = 8
CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
MNIST_NAMES = [str(i) for i in range(10)]
SPLITS = ("train", "validation", "test")


def examples(ds: tf.data.Dataset) -> list[tuple[int, bytes]]:
    """(label, image bytes) of every example of an unbatched split, in order."""
    return [(int(label), image.numpy().tobytes()) for image, label in ds]


def count(ds: tf.data.Dataset) -> int:
    return sum(1 for _ in ds)


def label_counts(ds: tf.data.Dataset) -> dict[int, int]:
    return dict(collections.Counter(label for label, _ in examples(ds)))


def synthetic(num: int = 10, num_classes: int = 3, shape=(4, 4, 1)) -> tf.data.Dataset:
    """Unbatched (image, int32 label) examples whose first pixel is the example index."""
    images = np.zeros((num, *shape), np.float32)
    images[:, 0, 0, 0] = np.arange(num)
    labels = (np.arange(num) % num_classes).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((images, labels))


@pytest.fixture
def tfds():
    return pytest.importorskip("tensorflow_datasets")


# --------------------------------------------------------------------------- flat image folders


def test_folder_class_names_are_sorted_and_sizes_add_up(tmp_path):
    root = write_image_folder(tmp_path / "zoo", classes=("zebra", "apple", "mango"))

    splits = data.load_data(str(root), image_size=IMAGE_SIZE)

    assert splits.class_names == ["apple", "mango", "zebra"]
    assert splits.num_classes == 3
    assert splits.source == str(root)
    # 12 per class: round(12 * 0.1) = 1 per class for validation and for test.
    assert splits.sizes == {"train": 30, "validation": 3, "test": 3}
    assert sum(splits.sizes.values()) == NUM_IMAGES
    assert {name: count(getattr(splits, name)) for name in SPLITS} == splits.sizes


def test_folder_split_is_stratified(image_folder):
    splits = data.load_image_folder(image_folder, image_size=IMAGE_SIZE, validation_fraction=0.25, test_fraction=0.25)

    assert label_counts(splits.validation) == {0: 3, 1: 3, 2: 3}
    assert label_counts(splits.test) == {0: 3, 1: 3, 2: 3}
    assert label_counts(splits.train) == {0: 6, 1: 6, 2: 6}


def test_folder_small_fraction_still_puts_every_class_in_every_split(image_folder):
    # round(12 * 0.02) = 0, but a class with enough images still gives one to each split.
    splits = data.load_image_folder(image_folder, image_size=IMAGE_SIZE, validation_fraction=0.02, test_fraction=0.02)

    for name in SPLITS:
        assert set(label_counts(getattr(splits, name))) == {0, 1, 2}, name


def test_folder_splits_are_disjoint_and_cover_every_image(image_folder):
    splits = data.load_image_folder(image_folder, image_size=IMAGE_SIZE)

    parts = [{image for _, image in examples(getattr(splits, name))} for name in SPLITS]

    assert sum(len(p) for p in parts) == NUM_IMAGES  # the noise images are all different
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_folder_split_is_deterministic_for_a_seed(image_folder):
    first = data.load_image_folder(image_folder, image_size=IMAGE_SIZE, seed=3)
    again = data.load_image_folder(image_folder, image_size=IMAGE_SIZE, seed=3)
    other = data.load_image_folder(image_folder, image_size=IMAGE_SIZE, seed=4)

    for name in SPLITS:
        assert examples(getattr(first, name)) == examples(getattr(again, name)), name
    held_out = set(examples(first.validation) + examples(first.test))
    assert held_out != set(examples(other.validation) + examples(other.test))


def test_folder_membership_is_fixed_across_iterations(image_folder):
    splits = data.load_image_folder(image_folder, image_size=IMAGE_SIZE)

    for name in SPLITS:
        ds = getattr(splits, name)
        assert examples(ds) == examples(ds), name


def test_folder_element_spec_and_pixel_range(image_folder):
    splits = data.load_data(str(image_folder), image_size=IMAGE_SIZE)

    assert splits.image_shape == (16, 16, 3)
    expected = (
        tf.TensorSpec((16, 16, 3), tf.float32),
        tf.TensorSpec((), tf.int32),
    )
    for name in SPLITS:
        assert getattr(splits, name).element_spec == expected, name
    images = np.stack([image for image, _ in splits.train.as_numpy_iterator()])
    assert images.min() >= 0 and images.max() <= 255
    assert images.max() > 1  # raw 0..255 pixels, not rescaled to 0..1


def test_folder_default_image_size_is_32(image_folder):
    splits = data.load_data(str(image_folder))

    assert splits.image_shape == (32, 32, 3)
    image, _ = next(iter(splits.test))
    assert image.shape == (32, 32, 3)


def test_folder_zero_validation_fraction_gives_an_empty_validation_split(image_folder):
    splits = data.load_image_folder(image_folder, image_size=IMAGE_SIZE, validation_fraction=0.0, test_fraction=0.25)

    assert splits.sizes == {"train": 27, "validation": 0, "test": 9}
    assert count(splits.validation) == 0
    assert splits.validation.element_spec == splits.train.element_spec


def test_hidden_folders_are_not_classes(image_folder):
    write_image_folder(image_folder, classes=(".ipynb_checkpoints",), per_class=2)

    splits = data.load_image_folder(image_folder, image_size=IMAGE_SIZE)

    assert splits.class_names == ["circle", "square", "triangle"]
    assert sum(splits.sizes.values()) == NUM_IMAGES


# --------------------------------------------------------------------------- train/ + test/


def test_train_test_layout_takes_test_from_test_folder(split_image_folder):
    splits = data.load_image_folder(split_image_folder, image_size=IMAGE_SIZE)

    test_files = data.expand_image_arguments([str(split_image_folder / "test")])
    on_disk = data.load_images(test_files, image_size=IMAGE_SIZE, channels=3).numpy()
    assert {image for _, image in examples(splits.test)} == {x.tobytes() for x in on_disk}
    assert label_counts(splits.test) == {0: 4, 1: 4, 2: 4}
    # validation comes out of train/: 12 per class there, round(1.2) = 1 each.
    assert splits.sizes == {"train": 33, "validation": 3, "test": 12}
    assert label_counts(splits.validation) == {0: 1, 1: 1, 2: 1}


def test_train_test_layout_mixes_the_test_classes(split_image_folder):
    splits = data.load_data(str(split_image_folder), image_size=IMAGE_SIZE)

    labels = [label for label, _ in examples(splits.test)]

    # On disk the test images are sorted by class; a take(n) (max_examples) must still see
    # several classes rather than only the first.
    assert labels != sorted(labels)
    assert len(set(labels[:6])) > 1


def test_train_test_layout_classes_come_from_train(split_image_folder):
    write_image_folder(split_image_folder / "train", classes=("zebra",), per_class=4, seed=3)

    splits = data.load_image_folder(split_image_folder, image_size=IMAGE_SIZE)

    assert splits.class_names == ["circle", "square", "triangle", "zebra"]
    assert 3 not in label_counts(splits.test)  # test/ has no zebra folder
    assert splits.sizes["test"] == 12


def test_train_test_layout_with_an_extra_test_class_raises(split_image_folder):
    write_image_folder(split_image_folder / "test", classes=("unicorn",), per_class=2)

    with pytest.raises(DataError, match=r"has classes that .* lacks.*unicorn"):
        data.load_data(str(split_image_folder))


# --------------------------------------------------------------------------- channels


def test_grayscale_folder_gives_one_channel(tmp_path):
    root = write_image_folder(tmp_path / "gray", mode="L", per_class=8)

    splits = data.load_image_folder(root, image_size=IMAGE_SIZE)

    assert splits.image_shape == (16, 16, 1)
    image, _ = next(iter(splits.train))
    assert image.shape == (16, 16, 1)


def test_rgb_folder_gives_three_channels(image_folder):
    assert data.detect_channels(data.expand_image_arguments([str(image_folder)])) == 3
    assert data.load_image_folder(image_folder, image_size=IMAGE_SIZE).image_shape == (16, 16, 3)


def test_channels_3_forced_on_grayscale_gives_equal_rgb_channels(tmp_path):
    root = write_image_folder(tmp_path / "gray", mode="L", per_class=8)

    splits = data.load_image_folder(root, image_size=IMAGE_SIZE, channels=3)

    assert splits.image_shape == (16, 16, 3)
    image, _ = next(iter(splits.train))
    assert image.shape == (16, 16, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_mixed_grayscale_jpeg_and_rgb_png_folder_loads_with_three_channels(tmp_path):
    root = tmp_path / "mixed"
    write_image_folder(root, mode="L", fmt="jpg", per_class=6, seed=1)
    write_image_folder(root, mode="RGB", fmt="png", per_class=6, seed=2)

    splits = data.load_image_folder(root, image_size=IMAGE_SIZE)

    assert splits.image_shape == (16, 16, 3)
    assert sum(splits.sizes.values()) == NUM_IMAGES
    for name in SPLITS:  # every file decodes to 3 channels, whatever its own mode
        assert count(getattr(splits, name)) == splits.sizes[name]


@pytest.mark.parametrize(("fmt", "channels"), [("bmp", None), ("bmp", 1), ("gif", 1)])
def test_grayscale_bmp_and_gif_load_with_one_channel(tmp_path, fmt, channels):
    # TF decodes BMP and GIF only to 3 or 4 channels; a grayscale request must still work.
    from PIL import Image

    root = write_image_folder(tmp_path / fmt, mode="L", fmt=fmt, per_class=4, size=16)

    splits = data.load_image_folder(root, image_size=IMAGE_SIZE, channels=channels)

    assert splits.image_shape == (16, 16, 1)
    assert sum(count(getattr(splits, name)) for name in SPLITS) == 12
    path = root / "square" / f"000.{fmt}"
    with Image.open(path) as image:
        expected = np.asarray(image.convert("L"), np.float32)[..., None]
    loaded = data.load_images([str(path)], image_size=IMAGE_SIZE, channels=1)
    assert loaded.shape == (1, 16, 16, 1)
    np.testing.assert_allclose(loaded[0], expected, atol=1)


# --------------------------------------------------------------------------- folder errors


def test_missing_folder_raises_naming_it(tmp_path):
    missing = tmp_path / "nowhere"

    expected = rf"does not exist.*Received: data={re.escape(str(missing))}"
    with pytest.raises(DataError, match=expected):
        data.load_data(str(missing))


def test_file_instead_of_folder_raises(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK")

    with pytest.raises(DataError, match=rf"not a file of another kind\. Received: data={re.escape(str(path))}"):
        data.load_data(str(path))


def test_folder_with_one_class_raises(tmp_path):
    root = write_image_folder(tmp_path / "one", classes=("only",), per_class=4)

    expected = rf"{re.escape(str(root))} needs at least two class folders"
    with pytest.raises(DataError, match=expected):
        data.load_data(str(root))


def test_class_folders_without_images_raise(tmp_path):
    root = tmp_path / "empty"
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        (root / name / "notes.txt").write_text("no pictures here")

    with pytest.raises(DataError, match=rf"No images .* under {re.escape(str(root))}"):
        data.load_data(str(root))


# --------------------------------------------------------------------------- max_examples


def test_max_examples_caps_every_split_and_the_sizes(image_folder):
    splits = data.load_data(str(image_folder), image_size=IMAGE_SIZE, max_examples=2)

    assert splits.sizes == {"train": 2, "validation": 2, "test": 2}
    assert {name: count(getattr(splits, name)) for name in SPLITS} == splits.sizes


def test_max_examples_larger_than_a_split_keeps_that_split(image_folder):
    splits = data.load_data(str(image_folder), image_size=IMAGE_SIZE, max_examples=5)

    assert splits.sizes == {"train": 5, "validation": 3, "test": 3}
    assert {name: count(getattr(splits, name)) for name in SPLITS} == splits.sizes


# --------------------------------------------------------------------------- load_images, arguments


def test_load_images_returns_a_float_batch(image_folder):
    paths = data.expand_image_arguments([str(image_folder / "circle")])[:3]

    images = data.load_images(paths, image_size=(8, 10), channels=3)
    gray = data.load_images(paths, image_size=(8, 10), channels=1)

    assert images.shape == (3, 8, 10, 3) and images.dtype == tf.float32
    assert gray.shape == (3, 8, 10, 1)
    assert 0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255


def test_load_images_missing_file_raises_naming_it(image_folder):
    good = data.expand_image_arguments([str(image_folder / "circle")])[0]
    missing = str(image_folder / "circle" / "gone.png")

    with pytest.raises(DataError, match=rf"Cannot read image {re.escape(missing)}.*NotFoundError"):
        data.load_images([good, missing], image_size=IMAGE_SIZE, channels=3)


def test_load_images_non_image_file_raises_naming_it(tmp_path):
    fake = tmp_path / "foo.png"
    fake.write_text("this is not a picture")

    with pytest.raises(DataError, match=rf"Cannot read image {re.escape(str(fake))}"):
        data.load_images([str(fake)], image_size=IMAGE_SIZE, channels=3)


def test_expand_image_arguments_searches_folders_recursively(tmp_path):
    write_image_folder(tmp_path / "pics" / "nested", classes=("a",), per_class=2)
    (tmp_path / "pics" / "readme.txt").write_text("skip me")
    single = write_image_folder(tmp_path / "other", classes=("b",), per_class=1) / "b" / "000.png"

    paths = data.expand_image_arguments([str(tmp_path / "pics"), str(single)])

    assert paths == [
        str(tmp_path / "pics" / "nested" / "a" / "000.png"),
        str(tmp_path / "pics" / "nested" / "a" / "001.png"),
        str(single),
    ]


def test_expand_image_arguments_missing_path_raises(tmp_path):
    missing = tmp_path / "nope.jpg"

    with pytest.raises(DataError, match=rf"{re.escape(str(missing))} does not exist"):
        data.expand_image_arguments([str(missing)])


def test_expand_image_arguments_folder_without_images_raises(tmp_path):
    (tmp_path / "blank").mkdir()

    with pytest.raises(DataError, match="No images"):
        data.expand_image_arguments([str(tmp_path / "blank")])


# --------------------------------------------------------------------------- prepare


def test_prepare_batches_in_order_when_not_training():
    ds = data.prepare(synthetic(10), batch_size=4, num_classes=3)

    batches = list(ds.as_numpy_iterator())

    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    assert batches[0][0].shape == (4, 4, 4, 1)
    order = np.concatenate([images[:, 0, 0, 0] for images, _ in batches])
    np.testing.assert_array_equal(order, np.arange(10))
    again = np.concatenate([images[:, 0, 0, 0] for images, _ in ds.as_numpy_iterator()])
    np.testing.assert_array_equal(again, order)


@pytest.mark.parametrize(
    ("label_mode", "dtype", "shape"),
    [("int", tf.int32, (4,)), ("binary", tf.float32, (4, 1)), ("categorical", tf.float32, (4, 3))],
    ids=["int", "binary", "categorical"],
)
def test_prepare_label_modes(label_mode, dtype, shape):
    ds = data.prepare(synthetic(8), batch_size=4, label_mode=label_mode, num_classes=3)

    _, labels = next(iter(ds))

    assert labels.dtype == dtype
    assert tuple(labels.shape) == shape
    expected = np.arange(4) % 3
    if label_mode == "categorical":
        np.testing.assert_array_equal(labels.numpy(), np.eye(3)[expected])
    else:
        np.testing.assert_array_equal(labels.numpy().reshape(-1), expected)


def test_encode_labels_unknown_mode_raises():
    with pytest.raises(ValueError, match="label_mode must be one of .*Received: label_mode=sparse"):
        data.encode_labels("sparse", 3)


def test_drop_remainder_gives_a_static_batch_dimension():
    static = data.prepare(synthetic(10), batch_size=4, drop_remainder=True)
    dynamic = data.prepare(synthetic(10), batch_size=4)

    assert static.element_spec[0].shape.as_list() == [4, 4, 4, 1]
    assert static.element_spec[1].shape.as_list() == [4]
    assert dynamic.element_spec[0].shape.as_list() == [None, 4, 4, 1]
    assert count(static) == 2 and count(dynamic) == 3


def test_training_reshuffles_every_epoch_with_a_seed():
    def two_epochs(seed):
        ds = data.prepare(synthetic(16), batch_size=16, training=True, seed=seed)
        return [tuple(int(i) for i in images[:, 0, 0, 0]) for _ in range(2) for images, _ in ds.as_numpy_iterator()]

    first, second = two_epochs(seed=1)

    assert sorted(first) == sorted(second) == list(range(16))
    assert first != tuple(range(16))
    assert first != second
    assert two_epochs(seed=1) == [first, second]  # the same seed, the same epochs


def test_augmenter_keeps_the_image_shape_and_changes_training_images_only():
    shape = (16, 16, 3)
    augmenter = data.make_augmenter(("flip", "rotation", "zoom", "crop"), shape)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(8, *shape)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, np.zeros(8, np.int32)))

    augmented = data.prepare(ds, batch_size=8, training=True, augmenter=augmenter, shuffle_buffer=1)
    evaluated = data.prepare(ds, batch_size=8, training=False, augmenter=augmenter)

    out, _ = next(iter(augmented))
    assert out.shape == (8, *shape) and out.dtype == tf.float32
    assert not np.allclose(out.numpy(), images)
    np.testing.assert_array_equal(next(iter(evaluated))[0].numpy(), images)


def test_should_cache_policies(monkeypatch):
    assert data.should_cache(10**12, (224, 224, 3), "memory") is True
    assert data.should_cache(1, (2, 2, 1), "off") is False
    assert data.should_cache(64, (32, 32, 3), "auto") is True
    assert data.should_cache(10**12, (224, 224, 3), "auto") is False
    # filling a cache holds the batches and their stack for a moment: twice the split's bytes
    monkeypatch.setattr(data.pipeline, "memory_budget", lambda: 2 * 10 * 4 * 2 * 2 * 1)
    assert data.should_cache(10, (2, 2, 1)) is True  # exactly fills the budget
    assert data.should_cache(11, (2, 2, 1)) is False
    assert data.should_cache(40, (2, 2, 1), uint8=True) is True  # a byte per value
    assert data.should_cache(41, (2, 2, 1), uint8=True) is False


def test_the_memory_budget_is_a_quarter_of_the_memory_available_now(monkeypatch):
    # Available, not physical: what other processes hold is not a cache's to fill.
    assert 0 < data.memory_budget() <= data.available_memory() // 4 + 1
    monkeypatch.setattr(data.pipeline, "available_memory", lambda: 4000)
    assert data.memory_budget() == 1000
    assert data.should_cache(125, (1,)) is True and data.should_cache(126, (1,)) is False


# --------------------------------------------------------------------------- tfds


def test_is_tfds_name(tmp_path):
    assert data.is_tfds_name("mnist")
    assert data.is_tfds_name("cifar10")
    assert not data.is_tfds_name("imagenet")
    assert not data.is_tfds_name(str(tmp_path / "mnist"))
    assert not data.is_tfds_name("data/cifar10")


def test_local_folder_named_mnist_is_a_folder(tmp_path):
    write_image_folder(tmp_path / "mnist", classes=("odd", "even"), per_class=4)  # tmp_path is cwd

    assert not data.is_tfds_name("mnist")
    splits = data.load_data("mnist", image_size=IMAGE_SIZE)
    assert splits.class_names == ["even", "odd"]
    assert splits.image_shape == (16, 16, 3)
    assert sum(splits.sizes.values()) == 8


@pytest.mark.parametrize(
    ("name", "shape"), [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))], ids=["mnist", "cifar10"]
)
def test_tfds_under_mock_data(tfds, tmp_path, name, shape):
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
        splits = data.load_data(name, data_dir=str(tmp_path / "tfds"))
        contents = {split: examples(getattr(splits, split)) for split in SPLITS}

    assert splits.source == name
    assert splits.image_shape == shape
    assert len(splits.class_names) == 10
    if name == "mnist":
        assert splits.class_names == MNIST_NAMES
    expected = (tf.TensorSpec(shape, tf.float32), tf.TensorSpec((), tf.int32))
    for split in SPLITS:
        assert getattr(splits, split).element_spec == expected, split
    # mock_data ignores split slicing: every split, sliced or not, yields num_examples.
    assert splits.sizes == {split: NUM_MOCK_EXAMPLES for split in SPLITS}
    assert {split: len(items) for split, items in contents.items()} == splits.sizes
    pixels = np.frombuffer(b"".join(image for _, image in contents["train"]), np.float32)
    assert pixels.min() >= 0 and pixels.max() <= 255 and pixels.max() > 1
    assert all(0 <= label < 10 for label, _ in contents["train"])


def test_tfds_image_size_resizes(tfds, tmp_path):
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
        splits = data.load_data("mnist", image_size=(32, 32), data_dir=str(tmp_path / "tfds"))
        image, _ = next(iter(splits.train))

    assert splits.image_shape == (32, 32, 1)
    assert image.shape == (32, 32, 1) and image.dtype == tf.float32


def test_tfds_channels_converts(tfds, tmp_path):
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
        rgb = data.load_data("mnist", channels=3, data_dir=str(tmp_path / "tfds"))
        rgb_image, _ = next(iter(rgb.test))
        gray = data.load_data("cifar10", channels=1, data_dir=str(tmp_path / "tfds"))
        gray_image, _ = next(iter(gray.test))

    assert rgb.image_shape == (28, 28, 3) and rgb_image.shape == (28, 28, 3)
    np.testing.assert_array_equal(rgb_image[..., 0], rgb_image[..., 2])
    assert gray.image_shape == (32, 32, 1) and gray_image.shape == (32, 32, 1)


def test_tfds_max_examples(tfds, tmp_path):
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
        splits = data.load_data("mnist", data_dir=str(tmp_path / "tfds"), max_examples=3)
        counts = {split: count(getattr(splits, split)) for split in SPLITS}

    assert splits.sizes == counts == {"train": 3, "validation": 3, "test": 3}


def _sliced_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """Like mock_data's fake examples, but as many as the split slice asks for (the first pixel
    is the index within the slice), and an empty slice fails as tfds' real reader fails."""
    del decoders, read_config, shuffle_files
    n = self.info.splits[split].num_examples
    if n == 0:
        raise ValueError(f"Instruction {split} corresponds to no data!")
    images = np.zeros((n, *self.info.features["image"].shape), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": np.arange(n) % 10})


@pytest.mark.parametrize(
    ("validation_fraction", "sizes"),
    [
        (0.1, {"train": 18, "validation": 2, "test": 6}),
        (0.0, {"train": 20, "validation": 0, "test": 6}),  # tfds has no empty slice
    ],
    ids=["validation_0.1", "validation_0"],
)
def test_tfds_prepared_metadata_holds_out_the_end_of_train(tfds, tmp_path, validation_fraction, sizes):
    write_tfds_metadata(tfds, "cifar10", tmp_path / "tfds", {"train": 20, "test": 6}, label_names=CIFAR10_NAMES)

    with tfds.testing.mock_data(data_dir=str(tmp_path / "tfds"), as_dataset_fn=_sliced_as_dataset):
        splits = data.load_data("cifar10", data_dir=str(tmp_path / "tfds"), validation_fraction=validation_fraction)
        contents = {split: examples(getattr(splits, split)) for split in SPLITS}

    assert splits.class_names == CIFAR10_NAMES
    assert splits.sizes == sizes
    assert {split: len(items) for split, items in contents.items()} == sizes
    assert splits.validation.element_spec == splits.train.element_spec


def test_tfds_prepare_failure_raises_data_error(tfds, tmp_path):
    def fail(self, *args, **kwargs):
        raise ConnectionError("no route to host\nlong traceback text")

    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", fail):
        expected = r"could not prepare 'mnist'.*--manual-dir.*ConnectionError: no route to host$"
        with pytest.raises(DataError, match=expected):
            data.load_data("mnist", data_dir=str(tmp_path / "tfds"))
        for name in data.TFDS_ARCHIVES["mnist"]:
            (tmp_path / name).write_bytes(b"not the real archive")
        with pytest.raises(DataError, match=rf"check that {re.escape(str(tmp_path))} holds the original"):
            data.load_data("mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path))


def test_manual_dir_without_the_archives_names_them(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    with pytest.raises(DataError, match="missing: train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz"):
        data.load_data("mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path))
    with pytest.raises(DataError, match="cifar-10-binary.tar.gz"):
        data.load_data("cifar10", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "nowhere"))


@pytest.mark.needs_shared
@pytest.mark.slow  # prepares all 70,000 MNIST images through tfds
@pytest.mark.skipif(not (SHARED_DATASETS / "mnist").is_dir(), reason="no ../shared/datasets/mnist")
def test_tfds_real_mnist_from_manual_dir(tmp_path):
    splits = data.load_data("mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(SHARED_DATASETS / "mnist"))

    assert splits.sizes == {"train": 54000, "validation": 6000, "test": 10000}
    assert splits.class_names == MNIST_NAMES
    assert count(splits.validation) == 6000
    no_validation = data.load_data("mnist", data_dir=str(tmp_path / "tfds"), validation_fraction=0.0)
    assert no_validation.sizes == {"train": 60000, "validation": 0, "test": 10000}
    assert count(no_validation.validation) == 0


def test_folder_images_are_whole_pixel_values_after_resizing(tmp_path):
    # Resizing leaves fractions; rounded, every value is one a uint8 cache keeps exactly.
    root = write_image_folder(tmp_path / "zoo", classes=("zebra", "apple"), per_class=3)
    splits = data.load_image_folder(root, image_size=(7, 5), validation_fraction=0.0, test_fraction=0.0)
    assert splits.uint8
    images = np.stack([x.numpy() for x, _ in splits.train])
    assert images.dtype == np.float32 and images.shape[1:] == (7, 5, 3)
    np.testing.assert_array_equal(images, np.clip(np.round(images), 0, 255))
    assert not np.signbit(images).any()  # no -0.0: the same bytes in every path
