"""Caches of what does not change between epochs: the frozen prefix of stage 2 (in memory or on
disk) trains as the full forward pass does, and the training pipeline gathers cached examples by
shuffled index in exactly the batches the buffer shuffle of the examples gives."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import staged

from kerastune_flow import data, models, rundir
from kerastune_flow.training import caches, finetune, train

SMALL_RGB = (32, 32, 3)
NUM_EXAMPLES = 20
# The staged fine-tune's settings: two progressive steps, each caching its own frozen prefix.
STAGES = dict(
    head_epochs=1, epochs=2, progressive="0:conv_3:1e-3,1:conv_2:1e-3", steps_per_execution=1, tensorboard=False
)


def test_stage_two_on_the_cached_prefix_trains_as_the_full_pass(image_folder, base_model, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kerastune_flow"):
        cached = train.train_and_evaluate(staged(image_folder, base_model, **STAGES), tmp_path / "cached")
    assert caplog.text.count("Cached the frozen prefix below layer") == 2  # each progressive step its own
    assert "below layer 6: train" in caplog.text and "below layer 4: train" in caplog.text
    full = train.train_and_evaluate(staged(image_folder, base_model, **STAGES, feature_cache="off"), tmp_path / "full")
    assert [r["stage"] for r in full.history] == ["head", "finetune", "finetune_2"]
    for ours, theirs in zip(cached.model.get_weights(), full.model.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    for key in ("loss", "val_loss", "val_accuracy"):
        assert [r[key] for r in cached.history] == pytest.approx([r[key] for r in full.history], abs=1e-5)
    saved = keras.saving.load_model(tmp_path / "cached" / rundir.BEST_MODEL)
    assert saved.input_shape == (None, *SMALL_RGB)  # the full model, taking images
    x = np.random.default_rng(4).uniform(0, 255, (2, *SMALL_RGB)).astype("float32")
    np.testing.assert_allclose(saved.predict(x, verbose=0), full.model.predict(x, verbose=0), atol=1e-5)
    assert not (tmp_path / "cached" / caches.CACHE_DIR).exists()


@pytest.mark.slow  # three more runs: the cache on disk trains as the one in memory
def test_stage_two_on_a_prefix_cached_on_disk_trains_as_in_memory(image_folder, base_model, tmp_path, caplog):
    memory = train.train_and_evaluate(
        staged(image_folder, base_model, **STAGES, feature_cache="memory"), tmp_path / "m"
    )
    with caplog.at_level(logging.INFO, logger="kerastune_flow"):
        disk = train.train_and_evaluate(
            staged(image_folder, base_model, **STAGES, feature_cache="disk"), tmp_path / "d"
        )
    assert "MiB on disk" in caplog.text and "MiB in memory" not in caplog.text
    assert memory.results["weights_sha256"] == disk.results["weights_sha256"]
    assert not (tmp_path / "d" / caches.CACHE_DIR).exists()  # removed once its stage ended


def test_the_prefix_and_the_rest_are_the_model_cut_in_two():
    model = models.build_vgg16_feature_extractor(input_shape=SMALL_RGB, weights=None, num_classes=3)
    base = models.find_base(model)
    index = models.unfreeze_from(base, models.VGG16_UNFREEZE_AT)
    prefix, rest = finetune.split_at_prefix(model, index)
    assert prefix.output_shape == (None, *base.get_layer("block4_pool").output.shape[1:])
    x = np.random.default_rng(3).uniform(0, 255, (4, *SMALL_RGB)).astype("float32")
    np.testing.assert_allclose(rest(prefix(x)), model(x), atol=1e-6)
    assert {id(v) for v in rest.trainable_variables} == {id(v) for v in model.trainable_variables}  # shared


def test_a_residual_over_the_boundary_keeps_the_full_pass():
    inputs = keras.Input(SMALL_RGB)
    a = keras.layers.Conv2D(3, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(3, 3, padding="same", name="b")(a)
    c = keras.layers.Conv2D(3, 3, padding="same", name="c")(b)
    out = keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.Add(name="add")([a, c]))
    base = keras.Model(inputs, out, name="base")
    model = models.build_transfer_model(base=base, num_classes=3, pooling="flatten")
    assert finetune.split_at_prefix(model, base.layers.index(base.get_layer("c"))) is None  # a skips over
    assert finetune.split_at_prefix(model, base.layers.index(base.get_layer("b"))) is not None


def test_a_cache_over_its_budget_spills_to_a_file_renamed_when_whole(tmp_path):
    features = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 3)])
    rng = np.random.default_rng(2)
    ds = tf.data.Dataset.from_tensor_slices((rng.normal(size=(20, 4, 4, 3)).astype("float32"), np.arange(20)))
    in_memory = caches.compute(features, ds.batch(8), policy="auto", folder=tmp_path, budget=10**9)
    spilled = caches.compute(features, ds.batch(8), policy="auto", folder=tmp_path, budget=100)
    assert (in_memory.where, spilled.where) == ("memory", "disk")
    assert isinstance(spilled.inputs, np.memmap)
    assert [p.suffixes[-2:] for p in tmp_path.iterdir()] == [[".npy", ".raw"]]  # no temporary file left
    np.testing.assert_array_equal(spilled.inputs, in_memory.inputs)
    np.testing.assert_array_equal(spilled.labels, np.arange(20))
    batches = caches.pipeline(spilled, batch_size=8, training=True, seed=1, shuffle_buffer=100)
    seen = np.concatenate([y for _, y in batches.as_numpy_iterator()])
    assert sorted(seen) == list(range(20)) and list(seen) != list(range(20))


def test_gathering_by_shuffled_index_gives_the_buffer_shuffles_batches():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (NUM_EXAMPLES, 8, 8, 3)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(NUM_EXAMPLES, dtype="int32") % 3))
    common = dict(batch_size=8, training=True, seed=5, augmenter=data.make_augmenter(("flip",), (8, 8, 3)))
    clock = data.EpochClock()
    gathered = data.prepare(ds, clock=clock, epochs=2, **common)
    buffered = data.prepare(ds, clock=clock, epochs=2, indexed=False, **common)
    for epoch in (1, 0):
        clock.set(epoch)
        for (xa, ya), (xb, yb) in zip(gathered, buffered, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    reshuffled = [data.prepare(ds, **common), data.prepare(ds, indexed=False, **common)]
    for _ in range(2):  # without a clock: a new order at every pass, the same on both
        first, second = ([y for _, y in d.as_numpy_iterator()] for d in reshuffled)
        np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))


# --------------------------------------------------------------------------- a cache's parts, kept for later runs


@pytest.mark.parametrize("policy", ["memory", "disk"])
def test_a_part_taken_from_a_cache_reads_its_rows_in_order(tmp_path, policy):
    features = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten()])
    x = np.arange(10 * 4, dtype="float32").reshape(10, 2, 2, 1)
    whole = caches.compute(
        features, tf.data.Dataset.from_tensor_slices((x, np.arange(10))).batch(4), policy=policy, folder=tmp_path
    )
    mask = np.isin(np.arange(10), [1, 4, 8])
    for part, rows in ((whole.take(mask), [1, 4, 8]), (whole.take(~mask).take(np.array([0, 6])), [0, 9])):
        assert list(part.labels) == rows and part.nbytes == len(rows) * 16
        batches = caches.pipeline(part, batch_size=2, training=False, shuffle_buffer=10)
        read = np.concatenate([inputs for inputs, _ in batches.as_numpy_iterator()])
        np.testing.assert_array_equal(read, x[rows].reshape(len(rows), 4))


def test_what_a_frozen_part_computes_is_its_fingerprint_whatever_its_layers_are_named():
    def part(scale: float) -> keras.Model:
        keras.utils.set_random_seed(1)
        return keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Rescaling(scale), keras.layers.Conv2D(2, 3)])

    first, again, rescaled = part(1 / 255), part(1 / 255), part(1 / 127.5)
    assert first.layers[-1].name != again.layers[-1].name  # Keras numbers each model's layers anew
    assert caches.fingerprint(first) == caches.fingerprint(again)
    assert caches.fingerprint(first) != caches.fingerprint(rescaled)  # the same weights, another preprocessing
    again.layers[-1].kernel.assign(again.layers[-1].kernel + 1e-3)
    assert caches.fingerprint(first) != caches.fingerprint(again)


def test_only_caches_in_memory_are_kept_and_the_oldest_go_beyond_the_budget():
    def made(where, nbytes):
        return lambda: caches.Cached(np.zeros(nbytes, np.uint8), np.zeros(nbytes), where)

    assert caches.shared("disk", made("disk", 10), budget=100)[1] is False
    assert caches.shared("disk", made("disk", 10), budget=100)[1] is False  # never kept
    first, kept = caches.shared("a", made("memory", 60), budget=100)
    assert not kept and caches.shared("a", made("memory", 60), budget=100) == (first, True)
    caches.shared("b", made("memory", 60), budget=100)  # 120 bytes: "a", the least recently used, goes
    assert caches.shared("b", made("memory", 60), budget=100)[1] is True
    assert caches.shared("a", made("memory", 60), budget=100)[1] is False
