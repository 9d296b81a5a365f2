"""The augmented-view cache: with --augment a transfer recipe passes K augmented views of each
training image through its frozen layers once, and each epoch trains on one view per image, drawn
from (seed, epoch, batch): deterministic, different from epoch to epoch, and exact on resume."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import add_callbacks, package_log_lines, run_outcome, smoke, staged

from kerastune_flow import data
from kerastune_flow.errors import ConfigError
from kerastune_flow.recipes import make_config
from kerastune_flow.training import caches, finetune, train, view_cache

NUM_EXAMPLES = 20
BATCH = 8
VIEWS = 3
SHAPE = (8, 8, 3)
AUGMENT = ("flip", "crop")
# The staged fine-tune on the small CNN base: two epochs a stage, its frozen layers cut at conv_3.
STAGES = dict(augment=AUGMENT, augment_views=2, head_epochs=2, epochs=2, unfreeze_at="conv_3", dropout=0.3, patience=2)
STAGES.update(steps_per_execution=1, max_examples=None)


def _examples(n=NUM_EXAMPLES):
    x = np.random.default_rng(0).uniform(0, 255, (n, *SHAPE)).astype("float32")
    return x, np.arange(n, dtype="int32")


def _counting(model, calls):
    """`model` with its predict_on_batch counted in `calls`."""
    original = model.predict_on_batch

    def predict_on_batch(x):
        calls.append(int(x.shape[0]))
        return original(x)

    model.predict_on_batch = predict_on_batch
    return model


def test_each_view_passes_through_the_frozen_part_once_with_its_own_seed(tmp_path):
    x, y = _examples()
    calls = []
    model = _counting(keras.Sequential([keras.Input(SHAPE), keras.layers.Conv2D(2, 3)]), calls)
    augmenter = data.make_augmenter(AUGMENT, SHAPE)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    views = view_cache.compute_views(model, ds, augmenter, views=VIEWS, seed=7, batch_size=BATCH, policy="memory")
    assert calls == [BATCH * VIEWS, BATCH * VIEWS, 4 * VIEWS]  # each batch's K views once, in one call here
    assert views.cached.inputs.shape[0] == NUM_EXAMPLES * VIEWS and views.views == VIEWS
    np.testing.assert_array_equal(views.labels, y)
    for i in (0, 9, 19):  # view k of image i is the augmenter's, with the seed (view seed k, batch index)
        start = i // BATCH * BATCH
        for k in range(VIEWS):
            seed = tf.constant([view_cache.view_seed(7, k), i // BATCH], tf.int64)
            expected = model(augmenter(x[start : start + BATCH], seed))[i - start]
            np.testing.assert_allclose(views.cached.inputs[views.rows[i, k]], expected, atol=1e-5)
    per_image = views.cached.inputs[views.rows]  # (n, K, ...)
    assert sum(not np.allclose(per_image[i, 0], per_image[i, 1]) for i in range(NUM_EXAMPLES)) > NUM_EXAMPLES // 4
    streams = []
    for per_call in (1, VIEWS):
        stream = view_cache.augmented_views(ds, augmenter, views=VIEWS, seed=7, batch_size=BATCH, per_call=per_call)
        streams.append(np.concatenate([v for v, _ in stream.as_numpy_iterator()]))
    np.testing.assert_array_equal(streams[0], streams[1])  # the same rows, whatever the views per call
    # At most a batch of 32 at 150x150 per call, in a number of views that divides K.
    assert [view_cache.views_per_call(8, 32, (size, size, 3)) for size in (32, 64, 150)] == [8, 4, 1]


def _served_views(ds, rows):
    """For each image, the view each served row is (the cache's row r holds the number r)."""
    served = {}
    for values, labels in ds.as_numpy_iterator():
        for value, label in zip(values[:, 0], labels, strict=True):
            served[int(label)] = list(rows[label]).index(int(value))
    return served


def test_a_view_is_drawn_per_image_and_epoch_the_same_way_on_every_pass_and_from_disk(tmp_path):
    rows = view_cache.row_map(NUM_EXAMPLES, VIEWS, BATCH)
    numbered = np.arange(NUM_EXAMPLES * VIEWS, dtype="float32")[:, None]  # row r holds r
    codes = np.empty(NUM_EXAMPLES * VIEWS, "int32")
    codes[rows] = np.arange(NUM_EXAMPLES)[:, None]  # each row's image, as its label
    in_memory = view_cache.Views(caches.Cached(numbered, codes, "memory"), rows, np.arange(NUM_EXAMPLES))
    path = tmp_path / "views.npy.raw"
    numbered.tofile(path)
    on_disk = caches.Cached(np.memmap(path, dtype="float32", mode="r", shape=numbered.shape), codes, "disk")
    clock = data.EpochClock()
    common = dict(batch_size=BATCH, seed=3, shuffle_buffer=100, clock=clock, epochs=4)
    memory_ds = view_cache.pipeline(in_memory, **common)
    disk_ds = view_cache.pipeline(view_cache.Views(on_disk, rows, in_memory.labels), **common)
    epochs = []
    for epoch in (0, 1, 2, 0):
        clock.set(epoch)
        epochs.append(_served_views(memory_ds, rows))
        assert _served_views(disk_ds, rows) == epochs[-1]
        assert sorted(epochs[-1]) == list(range(NUM_EXAMPLES))  # every image once an epoch
    assert epochs[3] == epochs[0]  # the same epoch, the same views
    assert epochs[1] != epochs[0] and epochs[2] != epochs[1]
    assert {v for epoch in epochs for v in epoch.values()} == set(range(VIEWS))


def test_the_budget_decides_memory_or_disk_and_counts_every_view(tmp_path):
    x, y = _examples()
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Conv2D(2, 3)])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    one_view = NUM_EXAMPLES * 6 * 6 * 2 * 4  # bytes of one view of the split
    kept = {}
    for budget in (2 * one_view, 4 * one_view):  # three views: over the first budget, within the second
        views = view_cache.compute_views(
            model, ds, data.make_augmenter(AUGMENT, SHAPE), views=VIEWS, seed=1, batch_size=BATCH,
            policy="auto", folder=tmp_path, name=f"b{budget}", budget=budget,
        )  # fmt: skip
        kept[views.cached.where] = views.cached.inputs
    assert isinstance(kept["disk"], np.memmap)
    np.testing.assert_array_equal(kept["disk"], kept["memory"])
    assert [p.suffixes[-2:] for p in tmp_path.iterdir()] == [[".npy", ".raw"]]  # renamed once whole


def test_augment_views_must_not_be_negative():
    assert make_config("vgg16_features", augment_views=0).model.augment_views == 0
    with pytest.raises(ConfigError, match=r"augment_views must be 0 .*Received: augment_views=-1$"):
        make_config("vgg16_features", augment_views=-1)


def test_no_views_keeps_the_full_forward_pass_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="kerastune_flow"):
        assert not finetune._can_cache(make_config("vgg16_features", augment=AUGMENT, augment_views=0))
        assert "full forward pass (no feature cache)" in caplog.text
        caplog.clear()
        assert finetune._can_cache(make_config("vgg16_features", augment=AUGMENT, augment_views=2))
        assert not finetune._can_cache(make_config("vgg16_features", augment=AUGMENT, feature_cache="off"))
    assert "full forward pass" not in caplog.text


class _KillAt(keras.callbacks.Callback):
    """Raises KeyboardInterrupt (as a kill ends the process) as epoch `epoch` begins, once."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.fired = epoch, False

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def uninterrupted(folder, base_model, tmp_path_factory):
    """The staged fine-tune on cached views, never interrupted, once for the module: (its
    outcome, its history, its log, its folder)."""
    run_dir = tmp_path_factory.mktemp("runs") / "whole"
    with package_log_lines() as lines:
        keras.utils.set_random_seed(0)
        result = train.train_and_evaluate(staged(folder, base_model, **STAGES), run_dir)
    return run_outcome(run_dir), result.history, "\n".join(lines), run_dir


def test_a_fine_tune_trains_on_cached_views_of_both_frozen_parts(uninterrupted):
    _, history, text, run_dir = uninterrupted
    assert text.count("Cached 2 augmented views of the frozen base's features: train") == 1
    assert text.count("Cached 2 augmented views of the frozen prefix below layer") == 1  # stage 2's own
    assert "full forward pass" not in text
    assert [r["stage"] for r in history] == ["head", "head", "finetune", "finetune"]
    assert history[1]["loss"] < history[0]["loss"]  # the head learns from the cached views
    assert not (run_dir / caches.CACHE_DIR).exists()  # removed once each stage ended


@pytest.mark.slow  # two more runs: killed in stage 2, resumed, it ends as the uninterrupted run
def test_a_fine_tune_on_cached_views_resumes_as_the_uninterrupted_run(
    folder, base_model, tmp_path, monkeypatch, uninterrupted
):
    config = staged(folder, base_model, **STAGES)
    kill = _KillAt(3)  # stage 2's second epoch: after its first epoch's backup
    with monkeypatch.context() as m:
        add_callbacks(m, kill)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, tmp_path / "run")
    assert kill.fired
    resumed = train.train_and_evaluate(config, tmp_path / "run")
    assert resumed.results["resumed"] is True
    assert run_outcome(tmp_path / "run") == uninterrupted[0]
    assert not (tmp_path / "run" / caches.CACHE_DIR).exists()


@pytest.mark.slow  # two more runs: views on disk train as views in memory; K=0 is the full pass
def test_views_on_disk_train_as_in_memory_and_no_views_is_the_full_pass(folder, base_model, tmp_path, caplog):
    common = dict(augment=AUGMENT, augment_views=2, base=str(base_model), base_output="dense", epochs=2)
    memory = train.train_and_evaluate(smoke("vgg16_features", folder, **common, feature_cache="memory"), tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="kerastune_flow"):
        disk = train.train_and_evaluate(smoke("vgg16_features", folder, **common, feature_cache="disk"), tmp_path / "d")
    assert "Cached 2 augmented views" in caplog.text and "MiB on disk" in caplog.text
    assert memory.results["weights_sha256"] == disk.results["weights_sha256"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kerastune_flow"):
        full = train.train_and_evaluate(
            smoke("vgg16_features", folder, **{**common, "augment_views": 0}), tmp_path / "full"
        )
    assert "full forward pass (no feature cache)" in caplog.text and "augmented views" not in caplog.text
    assert full.results["weights_sha256"] != memory.results["weights_sha256"]
