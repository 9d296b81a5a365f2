"""Cross-validation (issue 30): `--folds K` cuts the training and validation splits into K stratified
folds, one held out; `tune` scores each trial by the mean over its K runs, resumes per fold, and
trains the best settings once more on the whole training split for the test split."""

import logging

import numpy as np
import pytest
import tensorflow as tf
from conftest import package_log_lines, smoke

from kerastune_flow import data as data_lib
from kerastune_flow import run, rundir
from kerastune_flow.config import Config
from kerastune_flow.data.folds import fold_of_each
from kerastune_flow.data.samples import sample_folder
from kerastune_flow.errors import ConfigError
from kerastune_flow.recipes import make_config
from kerastune_flow.search import tune as tune_lib
from kerastune_flow.search import tune_report, tuner
from kerastune_flow.training import caches, setup, train

DIGITS = str(sample_folder("digits"))


def test_each_class_is_dealt_evenly_round_the_folds_the_same_way_every_time():
    labels = np.repeat([0, 1, 2], [10, 7, 5])
    assigned = fold_of_each(labels, 3, seed=4)
    for label in range(3):
        counts = np.bincount(assigned[labels == label], minlength=3)
        assert counts.max() - counts.min() <= 1  # stratified: each fold's share of each class
    sizes = np.bincount(assigned, minlength=3)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == labels.size
    np.testing.assert_array_equal(fold_of_each(labels, 3, seed=4), assigned)  # every trial, every resume
    assert not np.array_equal(fold_of_each(labels, 3, seed=5), assigned)


def test_a_class_smaller_than_the_folds_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="class 1 has 2 training and validation image.*--folds 2 or fewer"):
        fold_of_each(np.array([0, 0, 0, 1, 1]), 3, seed=0)


def _splits(train: int, validation: int, test: int) -> data_lib.DataSplits:
    def part(start, n):
        ids = np.arange(start, start + n, dtype="float32").reshape(n, 1, 1, 1)
        return tf.data.Dataset.from_tensor_slices((ids, (np.arange(n) % 2).astype("int32")))

    return data_lib.DataSplits(
        train=part(0, train),
        validation=part(train, validation),
        test=part(1000, test),
        class_names=["a", "b"],
        image_shape=(1, 1, 1),
        sizes={"train": train, "validation": validation, "test": test},
        source="numbers",
        test_source="numbers",
    )


def _ids(dataset: tf.data.Dataset) -> list[int]:
    return [int(x.reshape(())) for x, _ in dataset.as_numpy_iterator()]


def test_the_held_out_folds_partition_train_and_validation_and_leave_test_alone():
    held_out = []
    for fold in range(4):
        splits = data_lib.fold_splits(_splits(30, 10, 6), folds=4, fold=fold, seed=1)
        train, validation = _ids(splits.train), _ids(splits.validation)
        assert sorted(train + validation) == list(range(40)) and not set(train) & set(validation)
        assert splits.sizes == {"train": len(train), "validation": len(validation), "test": 6}
        assert _ids(splits.test) == list(range(1000, 1006))
        assert "stratified fold" in splits.split_sources["validation"]
        held_out += validation
    assert sorted(held_out) == list(range(40))  # each example validates exactly once
    with pytest.raises(ConfigError, match="--fold must be 0 to 3"):
        data_lib.fold_splits(_splits(30, 10, 6), folds=4, fold=4, seed=1)


def test_a_run_with_folds_trains_on_all_but_its_fold(image_folder):
    whole = data_lib.load_splits(smoke("scratch_mlp", image_folder))
    config = smoke("scratch_mlp", image_folder, folds=3, fold=2)
    splits = data_lib.load_splits(config)
    assert splits.sizes["train"] + splits.sizes["validation"] == whole.sizes["train"] + whole.sizes["validation"]
    assert splits.sizes["validation"] == (whole.sizes["train"] + whole.sizes["validation"]) // 3
    with pytest.raises(ConfigError, match="fold must be 0 to 2 with folds 3"):
        smoke("scratch_mlp", image_folder, folds=3, fold=3)


def test_a_fold_run_without_a_seed_says_every_fold_needs_the_one_it_drew(image_folder, tmp_path, caplog):
    strategy = tf.distribute.get_strategy()
    with caplog.at_level(logging.INFO, logger=setup.log.name):
        config = smoke("scratch_mlp", image_folder, folds=3, fold=1).replace(seed=None)
        seeded = setup.with_seed(config, tmp_path / "run", strategy)
    seed = seeded.train.seed
    assert f"pass --seed {seed} to repeat it and to every other fold's run: it cuts the folds" in caplog.text


@pytest.mark.parametrize(
    "sizes, given, folds, said",
    [
        ({"train": 1800, "validation": 200}, None, 5, "cross-validates over 5 stratified folds (2,000 training"),
        ({"train": 54000, "validation": 6000}, None, 1, "holds out one validation split (60,000 training"),
        ({"train": 1800, "validation": 200}, 1, 1, "holds out one validation split (folds=1 given"),
        ({"train": 54000, "validation": 6000}, 3, 3, "over 3 stratified folds (folds=3 given"),
    ],
)
def test_tune_cross_validates_small_data_by_default_and_says_why(caplog, sizes, given, folds, said):
    config = make_config("scratch_mlp", "reference", folds=given)
    with caplog.at_level(logging.INFO, logger=tune_lib.log.name):
        assert tune_lib._folds(config, sizes, {}) == folds
    assert said in caplog.text
    with pytest.raises(ConfigError, match="leave --fold out"):
        tune_lib._folds(config, sizes, {"fold": 1})


@pytest.mark.parametrize(
    "recipe, augment, against_full_pass",
    [
        ("vgg16_features", (), False),  # the frozen base's features
        pytest.param("vgg16_finetune", (), True, marks=pytest.mark.slow),  # and stage 2's prefix; rows right
        pytest.param("vgg16_finetune", ("flip",), False, marks=pytest.mark.slow),  # K augmented views, taken too
    ],
)
def test_the_folds_compute_the_frozen_parts_once_and_train_as_each_fold_alone(
    folder, base_model, tmp_path, monkeypatch, caplog, recipe, augment, against_full_pass
):
    passes = []
    original_compute = caches.compute
    monkeypatch.setattr(caches, "compute", lambda *a, **k: passes.append(k.get("name")) or original_compute(*a, **k))
    config = smoke(recipe, folder, base=str(base_model), base_output="dense", folds=2, head_epochs=1, epochs=1)
    config = config.replace(augment=augment, tensorboard=False)
    with caplog.at_level(logging.INFO, logger="kerastune_flow"):
        train.train_and_evaluate(config.replace(fold=0), tmp_path / "fold-0")
        first = list(passes)
        shared = train.train_and_evaluate(config.replace(fold=1), tmp_path / "fold-1")
    # one pass over the merged images for the base (and for stage 2's prefix), views and plain with --augment
    assert len(first) == (1 + (recipe == "vgg16_finetune")) * (2 if augment else 1)
    assert all("merged" in name for name in first)
    assert passes == first  # the second fold computed nothing
    assert "this fold's rows taken" in caplog.text and "earlier run in this process over every fold's" in caplog.text
    caches.forget()  # the same fold in a process of its own: the same model, bit for bit
    alone = train.train_and_evaluate(config.replace(fold=1), tmp_path / "alone")
    assert alone.results["weights_sha256"] == shared.results["weights_sha256"]
    if against_full_pass:  # the rows taken are the fold's: as the full forward pass on the fold's images trains
        full = train.train_and_evaluate(config.replace(fold=1, feature_cache="off"), tmp_path / "full")
        for ours, theirs in zip(shared.model.get_weights(), full.model.get_weights(), strict=True):
            np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_search_resumes_with_the_folds_it_started_with(tmp_path, caplog):
    config = make_config("scratch_mlp", "reference")
    small = {"train": 1800, "validation": 200}
    record = tmp_path / "search.json"
    rundir.atomic_write_json(record, {"recipe": "scratch_mlp", "seed": 3})  # a search from before folds
    with caplog.at_level(logging.INFO, logger=tune_lib.log.name):
        assert tune_lib._folds(config, small, {}, record) == 1  # it held out one split: it still does
        rundir.atomic_write_json(record, {"recipe": "scratch_mlp", "seed": 3, "folds": 4})
        assert tune_lib._folds(config, small, {}, record) == 4
    assert f"as the search in {tmp_path} started" in caplog.text
    assert tune_lib._folds(make_config("scratch_mlp", "reference", folds=2), small, {}, record) == 2


def test_a_cross_validated_search_scores_the_mean_resumes_per_fold_and_retrains_the_best(tmp_path, monkeypatch):
    run_dir = tmp_path / "search"
    # seed 5: the random trial's rate (1.8e-3) beats the defaults' here, so DIR/best is trained (either way holds)
    settings = dict(data=DIGITS, preset="smoke", epochs=1, max_examples=48, folds=2, seed=5, verbose=0, final_seeds=2)
    trained = []
    original = tuner.train_and_evaluate

    def killed_in_the_second_fold(config, fold_dir, **kwargs):
        if fold_dir.parent.name == "000" and fold_dir.name == "fold-1" and not trained.count(str(fold_dir)):
            trained.append(str(fold_dir))
            raise KeyboardInterrupt  # a kill in trial 0's second fold
        trained.append(str(fold_dir))
        return original(config, fold_dir, **kwargs)

    monkeypatch.setattr(tuner, "train_and_evaluate", killed_in_the_second_fold)
    with pytest.raises(KeyboardInterrupt):
        tune_lib.tune("scratch_mlp", run_dir, trials=2, tuner="random", space=["learning_rate"], **settings)
    with package_log_lines() as lines:
        summary = tune_lib.tune("scratch_mlp", run_dir, trials=2, tuner="random", space=["learning_rate"], **settings)
    trial0 = tune_report.trial_run_dir(run_dir, "0")
    assert trained.count(str(trial0 / "fold-0")) == 1  # finished before the kill: not trained again
    assert any("had finished fold-0 before the interruption" in line for line in lines)

    for t in summary["trials"]:
        folds = t["folds"]
        assert [f["fold"] for f in folds] == [0, 1]
        for f in folds:
            history = rundir.read_history(tune_report.trial_run_dir(run_dir, t["trial"]) / f"fold-{f['fold']}")
            assert f["objective"] == max(r["val_accuracy"] for r in history)
        assert t["objective"] == pytest.approx(np.mean([f["objective"] for f in folds]))
        assert t["spread"] == pytest.approx(np.std([f["objective"] for f in folds], ddof=1))
    assert any("(mean of 2 folds:" in line for line in lines)
    # The best settings, trained once more on the whole training split, and the defaults: on test.
    best = rundir.read_json(run_dir / tune_lib.BEST_CONFIG)
    assert best["config"]["data"]["folds"] is None and best["config"]["data"]["fold"] == 0
    assert summary["defaults"]["run_dir"] == str(run_dir / tune_lib.DEFAULTS_DIR)
    # (the defaults' run is the best's when the first trial, the defaults, won: trained once)
    best_dir = run_dir / (tune_lib.BEST_DIR if summary["best"]["trial"] != "0" else tune_lib.DEFAULTS_DIR)
    assert summary["best"]["run_dir"] == str(best_dir)
    assert (run_dir / tune_lib.BEST_DIR).exists() == (summary["best"]["trial"] != "0")
    for name in {best_dir.name, tune_lib.DEFAULTS_DIR}:
        meta = rundir.read_json(run_dir / name / rundir.CONFIG_JSON)
        assert Config.from_dict(meta["config"]).data.folds is None
        assert rundir.read_json(run_dir / name / rundir.RESULTS_JSON)["test"]["accuracy"] is not None
    assert summary["test"]["best"]["examples"] == summary["test"]["defaults"]["examples"] > 0
    # best_config.json replays the run the test split judged, bit for bit
    replay = ["train", "scratch_mlp", "--config", str(run_dir / tune_lib.BEST_CONFIG), "--quiet"]
    assert run.main([*replay, "--run-dir", str(tmp_path / "replay")]) == 0
    sha = [rundir.read_json(d / rundir.RESULTS_JSON)["weights_sha256"] for d in (tmp_path / "replay", best_dir)]
    assert sha[0] == sha[1]
    # Each seed's best and defaults on test, paired by seed (the second seed's runs trained after the search).
    seeds = summary["test_seeds"]
    assert seeds["seeds"] == [5, 6] and seeds["run_dirs"]["defaults"][1] == str(run_dir / "seeds" / "defaults-6")
    assert seeds["best"][0] == summary["test"]["best"] and seeds["defaults"][0] == summary["test"]["defaults"]
    for which in ("best", "defaults"):
        for path, metrics in zip(seeds["run_dirs"][which], seeds[which], strict=True):
            assert rundir.read_json(f"{path}/config.json")["config"]["train"]["seed"] in (5, 6)
            assert metrics["examples"] == summary["test"]["best"]["examples"]
    paired = [b["accuracy"] - d["accuracy"] for b, d in zip(seeds["best"], seeds["defaults"], strict=True)]
    assert seeds["accuracy"]["differences"] == pytest.approx(paired)
    report = (run_dir / "report.md").read_text()
    assert tune_report.seeds_sentence(seeds) in report
    assert "mean of 2 folds" in report and "spread (sd)" in report


def test_a_search_from_before_folds_resumes_as_the_one_hold_out_it_was(tmp_path):
    old = {"recipe": "scratch_mlp", "tuner": "random", "seed": 3, "trials_asked": 2}  # search.json without folds
    rundir.atomic_write_json(tmp_path / tune_lib.SEARCH_JSON, old)
    asked = {k: v for k, v in old.items() if k != "trials_asked"}
    record = tune_lib._search_record(tmp_path, {**asked, "folds": 1}, budget={"trials_asked": 2})
    assert record["folds"] == 1
    with pytest.raises(ConfigError, match="other settings \\(folds: 1\\)"):
        tune_lib._search_record(tmp_path, {**asked, "folds": 5}, budget={"trials_asked": 2})


def test_the_difference_over_seeds_is_called_noise_unless_beyond_two_standard_errors():
    within = tune_report.difference([0.70, 0.66, 0.69], [0.68, 0.67, 0.66])  # +2, -1, +3 points
    assert within["mean"] == pytest.approx(0.0133, abs=1e-4) and within["within_noise"] is True
    assert "within noise (under 2 standard errors), not a shown gain" in tune_report.seeds_sentence(
        {"seeds": [0, 1, 2], "accuracy": within}
    )
    beyond = tune_report.difference([0.72, 0.73, 0.72], [0.68, 0.69, 0.685])
    assert beyond["within_noise"] is False
    assert "better beyond the noise" in tune_report.seeds_sentence({"seeds": [0, 1, 2], "accuracy": beyond})
    one = tune_report.difference([0.7], [0.6])
    assert one["sd"] is None and one["within_noise"] is None
    assert "one seed: no spread" in tune_report.seeds_sentence({"seeds": [0], "accuracy": one})
