"""Augmentation and epoch order as functions of the seed: the same seed, the same batches, in any run."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.data.ops import dataset_ops

from kerastune_flow import data
from kerastune_flow.data import augment
from kerastune_flow.recipes import make_config
from kerastune_flow.runtime import device
from kerastune_flow.training import callbacks as cb
from kerastune_flow.training import fitting

SHAPE = (16, 12, 3)
NUM_SAMPLES = 24


def _images(n=8, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=(n, *SHAPE)).astype(np.float32)


def _seed(a, b=0):
    return tf.constant([a, b], tf.int64)


@pytest.mark.parametrize(
    "names", [("flip",), ("crop",), ("rotation",), ("zoom",), ("crop", "flip", "rotation", "zoom")]
)
def test_the_same_seed_gives_the_same_batch_and_another_seed_another(names):
    augmenter = data.make_augmenter(names, SHAPE)
    images = tf.constant(_images())

    first, again, other = (augmenter(images, s).numpy() for s in (_seed(1), _seed(1), _seed(2)))

    assert first.shape == images.shape and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, images.numpy())


def test_flip_mirrors_some_images_and_leaves_the_others():
    images = _images(32)
    out = augment.random_flip(tf.constant(images), _seed(3)).numpy()
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each one or the other
    assert 4 <= sum(flipped) <= 28


def test_crop_is_a_window_of_the_zero_padded_image():
    images = _images(16)
    out = augment.random_crop(tf.constant(images), 2, 1, _seed(4)).numpy()
    padded = np.pad(images, [(0, 0), (2, 2), (1, 1), (0, 0)])
    offsets = []
    for o, p in zip(out, padded, strict=True):
        found = [(y, x) for y in range(5) for x in range(3) if np.array_equal(o, p[y : y + SHAPE[0], x : x + SHAPE[1]])]
        assert found
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # a random place per image, not one for the batch


def test_rotation_and_zoom_are_identities_at_zero_strength():
    images = tf.constant(_images())
    np.testing.assert_allclose(augment.random_rotation(images, 0.0, _seed(5)), images, atol=1e-3)
    np.testing.assert_allclose(augment.random_zoom(images, 0.0, _seed(5)), images, atol=1e-3)


def test_crop_and_flip_in_one_gather_are_the_two_steps():
    images, seed = tf.constant(_images(n=32)), _seed(7)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    two_steps = augment.random_flip(augment.random_crop(images, 2, 1, crop_seed), flip_seed)
    fused = data.make_augmenter(("flip", "crop"), SHAPE)(images, seed)
    np.testing.assert_array_equal(fused.numpy(), two_steps.numpy())
    flipped = tf.reverse(augment.random_crop(images, 2, 1, crop_seed), axis=[2])
    assert 0 < sum(np.array_equal(a, b) for a, b in zip(fused.numpy(), flipped.numpy(), strict=True)) < 32


@pytest.mark.parametrize("names", [("crop", "flip"), ("crop", "flip", "rotation", "zoom")])
def test_a_uint8_batch_augments_as_the_same_whole_values_in_float32(names):
    # A uint8 cache hands the augmenter uint8 batches: the same images, the same float32 result.
    whole = np.round(_images())
    augmenter = data.make_augmenter(names, SHAPE)
    from_uint8 = augmenter(tf.constant(whole.astype(np.uint8)), _seed(3))
    assert from_uint8.dtype == tf.float32
    np.testing.assert_array_equal(from_uint8.numpy(), augmenter(tf.constant(whole), _seed(3)).numpy())


def test_a_uint8_pipeline_serves_the_float32_batches_of_the_float_one():
    whole = np.round(_images(n=40))
    ds = tf.data.Dataset.from_tensor_slices((whole, np.arange(40, dtype=np.int32) % 3))
    augmenter = data.make_augmenter(("crop", "flip"), SHAPE)
    for training, cache in ((True, True), (True, False), (False, True)):  # streamed: a uint8 shuffle buffer
        kwargs = dict(batch_size=16, training=training, cache=cache, augmenter=augmenter, seed=4)
        as_uint8 = [x.numpy() for x, _ in data.prepare(ds, uint8=True, **kwargs)]
        as_float = [x.numpy() for x, _ in data.prepare(ds, **kwargs)]
        assert all(x.dtype == np.float32 for x in as_uint8) and len(as_uint8) == 3
        for a, b in zip(as_uint8, as_float, strict=True):
            np.testing.assert_array_equal(a, b)


def test_unknown_names_and_no_names():
    assert data.make_augmenter((), SHAPE) is None
    with pytest.raises(ValueError, match="augment must be one of flip, rotation, zoom, crop"):
        data.make_augmenter(("blur",), SHAPE)


# --------------------------------------------------------------------------- the epoch clock


def _examples():
    labels = np.arange(NUM_SAMPLES, dtype=np.int32) % 3
    return tf.data.Dataset.from_tensor_slices((_images(NUM_SAMPLES, seed=1), labels))


def _clocked(clock, *, epochs=4, names=("flip", "crop"), seed=7):
    return data.prepare(
        _examples(),
        batch_size=8,
        training=True,
        augmenter=data.make_augmenter(names, SHAPE),
        shuffle_buffer=NUM_SAMPLES,
        seed=seed,
        clock=clock,
        epochs=epochs,
    )


def _epoch(ds, clock, epoch):
    clock.set(epoch)
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_an_epoch_is_the_same_whichever_epochs_came_before():
    clock = data.EpochClock()
    ds = _clocked(clock)
    assert int(ds.cardinality()) == NUM_SAMPLES // 8  # Keras counts the steps of every epoch
    in_order = [_epoch(ds, clock, e) for e in range(4)]

    fresh_clock = data.EpochClock()
    resumed = _clocked(fresh_clock)  # a new process resumed at epoch 2
    for epoch in (2, 3):
        for (x, y), (x2, y2) in zip(in_order[epoch], _epoch(resumed, fresh_clock, epoch), strict=True):
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y, y2)

    orders = [np.concatenate([y for _, y in batches]) for batches in in_order]
    assert not np.array_equal(orders[0], orders[1])  # every epoch its own order
    assert sorted(orders[0].tolist()) == sorted(orders[1].tolist())  # of the same examples


def test_the_clock_is_read_when_the_epochs_first_batch_is_made_not_when_its_iterator_is():
    # Keras makes the next epoch's iterator before the epoch begins (and sets the clock).
    clock = data.EpochClock()
    ds = _clocked(clock)
    expected = _epoch(ds, clock, 3)
    clock.set(0)
    iterator = iter(ds)
    clock.set(3)
    first = next(iterator)
    np.testing.assert_array_equal(first[0].numpy(), expected[0][0])


def test_another_seed_another_order_and_augmentation():
    clock = data.EpochClock()
    a, b = _epoch(_clocked(clock, seed=1), clock, 0), _epoch(_clocked(clock, seed=2), clock, 0)
    assert not np.array_equal(np.concatenate([y for _, y in a]), np.concatenate([y for _, y in b]))


def test_without_a_clock_two_iterations_differ_but_two_pipelines_agree():
    def run():
        ds = data.prepare(
            _examples(), batch_size=8, training=True, augmenter=data.make_augmenter(("flip",), SHAPE), seed=3
        )
        return [np.concatenate([x.numpy() for x, _ in ds]) for _ in range(2)]

    first, second = run(), run()
    assert not np.array_equal(first[0], first[1])  # reshuffled and re-augmented every epoch
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


@pytest.mark.parametrize("global_seed", [None, 0, 123])
def test_each_epoch_is_the_seeded_buffer_shuffle_whatever_the_global_seed(global_seed):
    # The order of epoch e is `ds.shuffle(buffer, seed=epoch_seed(seed, e))`'s, the global seed
    # included (a run's seed 0 sets it to 0, which the shuffle op's seed pair must survive).
    tf.random.set_seed(global_seed)
    try:
        clock = data.EpochClock()
        ds = tf.data.Dataset.range(50)
        ordered = data.epoch_ordered(ds, clock=clock, epochs=3, seed=4, shuffle_buffer=16)
        assert int(ordered.cardinality()) == 50
        for epoch in (2, 0, 1):
            clock.set(epoch)
            expected = ds.shuffle(16, seed=data.epoch_seed(4, epoch), reshuffle_each_iteration=False)
            assert list(ordered.as_numpy_iterator()) == list(expected.as_numpy_iterator())
    finally:
        tf.random.set_seed(None)


def _graph_nodes(ds):
    graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)


def test_nothing_in_the_pipeline_is_built_per_epoch():
    # Every iterator instantiates the whole pipeline: one branch per possible epoch (an earlier
    # version) made each epoch's start cost grow with the run's epochs.
    sizes = {epochs: _graph_nodes(_clocked(data.EpochClock(), epochs=epochs)) for epochs in (2, 64)}
    assert sizes[64] == sizes[2]


def test_a_fit_makes_one_training_iterator_an_epoch(tmp_path, monkeypatch):
    # Keras makes two an epoch when it is not told the steps and throws one away: each pays the
    # pipeline's start (its functions instantiated anew), the fixed cost of a short epoch.
    clock = data.EpochClock()
    ds = _clocked(clock, epochs=4)
    made = []
    original = dataset_ops.DatasetV2.__iter__
    monkeypatch.setattr(dataset_ops.DatasetV2, "__iter__", lambda ds: made.append(ds) or original(ds))
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    config = make_config("cifar10_cnn", "smoke")
    context = fitting.FitContext(
        config, tmp_path, tf.distribute.get_strategy(), device.device_settings("cpu"), 3, clock, epochs=4
    )
    assert fitting.fit(model, ds, None, context, [cb.EpochSeeds(clock)], epochs=4) == 4
    assert len(made) == 4 + 1  # one per epoch, and one made as the last epoch ends
