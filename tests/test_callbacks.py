"""The standard callback set, on a one-layer model and 32 examples."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerastune_flow import rundir
from kerastune_flow.errors import TrainingDivergedError
from kerastune_flow.rundir import (
    BACKUP_DIR,
    BEST_MODEL,
    HISTORY_CSV,
    HISTORY_JSONL,
    TENSORBOARD_DIR,
    read_history,
)
from kerastune_flow.training import callbacks as callbacks_lib
from kerastune_flow.training.callbacks import (
    BestModelCheckpoint,
    DiskSpaceGuard,
    EarlyStopping,
    EpochSeeds,
    HistoryLogger,
    NaNGuard,
    ProgressBar,
    current_learning_rate,
    standard_callbacks,
)
from kerastune_flow.training.resume import RunBackup

NUM_SAMPLES = 32
NUM_FEATURES = 4
BATCH_SIZE = 8
STEPS_PER_EPOCH = NUM_SAMPLES // BATCH_SIZE
EPOCHS = 3
LEARNING_RATE = 0.05
TRUE_WEIGHTS = np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")

STANDARD_ORDER = [
    EpochSeeds,
    NaNGuard,
    DiskSpaceGuard,
    HistoryLogger,
    BestModelCheckpoint,
    EarlyStopping,
    keras.callbacks.TensorBoard,
    RunBackup,
]
RECORD_KEYS = {"epoch", "loss", "val_loss", "learning_rate", "epoch_seconds", "wall_time"}


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(NUM_SAMPLES, NUM_FEATURES)).astype("float32")
    y = (x @ TRUE_WEIGHTS + rng.normal(scale=0.1, size=(NUM_SAMPLES, 1))).astype("float32")
    return x, y


def _model(learning_rate=LEARNING_RATE) -> keras.Model:
    model = keras.Sequential([keras.Input((NUM_FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    return model


def _fit(model, callbacks, *, epochs=EPOCHS, **kwargs):
    x, y = _data(0)
    return model.fit(
        x,
        y,
        validation_data=_data(1),
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **kwargs,
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _temp_files(directory: Path) -> list[str]:
    """Leftovers of the atomic writers: hidden `.name.XXXX.tmp...` files."""
    return sorted(p.name for p in directory.rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


def _kernel(model: keras.Model) -> np.ndarray:
    return keras.ops.convert_to_numpy(model.layers[0].kernel)


class _PoisonWeightsAt(keras.callbacks.Callback):
    """Sets the kernel to NaN when `epoch` begins, so its first batch's loss is NaN."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            kernel = self.model.layers[0].kernel
            kernel.assign(np.full(kernel.shape, np.nan, dtype="float32"))


class _Crash(Exception):
    pass


class _CrashAtEpochEnd(keras.callbacks.Callback):
    """Simulates a kill after the history and best model of `epoch` are written, before its backup."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise _Crash(f"killed at the end of epoch {epoch}")


# --------------------------------------------------------------------------- standard_callbacks


def test_standard_callbacks_order(tmp_path):
    run_dir = tmp_path / "run"

    callbacks = standard_callbacks(run_dir)

    assert [type(c) for c in callbacks] == STANDARD_ORDER
    assert run_dir.is_dir()


@pytest.mark.parametrize(
    "flag, removed",
    [
        ("terminate_on_nan", NaNGuard),
        ("checkpoint", BestModelCheckpoint),
        ("early_stopping", EarlyStopping),
        ("tensorboard", keras.callbacks.TensorBoard),
        ("backup", RunBackup),
    ],
)
def test_each_flag_switches_its_callback_off(tmp_path, flag, removed):
    callbacks = standard_callbacks(tmp_path, **{flag: False})

    assert [type(c) for c in callbacks] == [t for t in STANDARD_ORDER if t is not removed]


@pytest.mark.parametrize("csv_log, jsonl_log", [(False, True), (True, False)])
def test_one_history_file_off_keeps_the_logger_for_the_other(tmp_path, csv_log, jsonl_log):
    callbacks = standard_callbacks(tmp_path, csv_log=csv_log, jsonl_log=jsonl_log)

    [logger] = [c for c in callbacks if isinstance(c, HistoryLogger)]
    assert (logger.csv_log, logger.jsonl_log) == (csv_log, jsonl_log)


def test_both_history_files_off_removes_the_logger(tmp_path):
    callbacks = standard_callbacks(tmp_path, csv_log=False, jsonl_log=False)

    assert [type(c) for c in callbacks] == [t for t in STANDARD_ORDER if t is not HistoryLogger]


def test_standard_callbacks_pass_their_settings_on(tmp_path):
    callbacks = standard_callbacks(tmp_path, stage="head", monitor="val_accuracy", patience=7, best=0.8)
    by_type = {type(c): c for c in callbacks}

    assert by_type[HistoryLogger].stage == "head"
    checkpoint = by_type[BestModelCheckpoint]
    assert (checkpoint.filepath, checkpoint.monitor, checkpoint.mode, checkpoint.best) == (
        tmp_path / BEST_MODEL,
        "val_accuracy",
        "max",
        0.8,
    )
    stopping = by_type[EarlyStopping]
    assert (stopping.monitor, stopping.patience, stopping.restore_best_weights) == ("val_accuracy", 7, True)
    assert Path(by_type[keras.callbacks.TensorBoard].log_dir) == tmp_path / TENSORBOARD_DIR
    backup = by_type[RunBackup]
    assert backup.folder == tmp_path / BACKUP_DIR / "head"
    assert backup.stateful == {"checkpoint": checkpoint, "early_stopping": stopping}


def test_backup_without_stage_goes_to_fit_folder(tmp_path):
    backup = standard_callbacks(tmp_path)[-1]

    assert backup.folder == tmp_path / BACKUP_DIR / "fit"


# --------------------------------------------------------------------------- a fit with the standard set


def test_fit_with_standard_callbacks_writes_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    model = _model()
    callbacks = standard_callbacks(run_dir)

    history = _fit(model, callbacks)

    records = read_history(run_dir)
    assert [r["epoch"] for r in records] == list(range(EPOCHS))
    for record in records:
        assert RECORD_KEYS <= set(record)
        assert "stage" not in record
        assert record["learning_rate"] == pytest.approx(LEARNING_RATE)
        assert 0 < record["epoch_seconds"] < 60
    for before, after in zip(records, records[1:], strict=False):  # each epoch ran between two wall times
        assert after["wall_time"] - before["wall_time"] >= after["epoch_seconds"] - 0.01
    assert [r["loss"] for r in records] == pytest.approx(history.history["loss"])
    assert [r["val_loss"] for r in records] == pytest.approx(history.history["val_loss"])
    assert [r["wall_time"] for r in records] == sorted(r["wall_time"] for r in records)

    rows = _read_csv(run_dir / HISTORY_CSV)
    assert len(rows) == EPOCHS
    for row, record in zip(rows, records, strict=True):
        assert set(row) == set(record)
        assert int(row["epoch"]) == record["epoch"]
        assert {k: float(v) for k, v in row.items()} == pytest.approx(record)

    checkpoint = next(c for c in callbacks if isinstance(c, BestModelCheckpoint))
    best_epoch = int(np.argmin(history.history["val_loss"]))
    assert checkpoint.best_epoch == best_epoch
    best = keras.saving.load_model(run_dir / BEST_MODEL)
    x_val, y_val = _data(1)
    assert best.evaluate(x_val, y_val, verbose=0) == pytest.approx(history.history["val_loss"][best_epoch], rel=1e-5)

    assert list((run_dir / TENSORBOARD_DIR).rglob("events.out.tfevents.*"))
    # The backup stays until the run is over (train_and_evaluate removes it): one epoch and the one before.
    state = json.loads((run_dir / BACKUP_DIR / "fit" / "state.json").read_text())
    assert (state["epoch"], state["previous"]["epoch"]) == (EPOCHS, EPOCHS - 1)
    assert state["callbacks"]["checkpoint"] == {"best": min(history.history["val_loss"]), "best_epoch": best_epoch}
    best_files = {s["callbacks"]["early_stopping"]["best_weights_file"] for s in (state, state["previous"])}
    assert f"weights-{best_epoch + 1}.weights.h5" == state["callbacks"]["early_stopping"]["best_weights_file"]
    assert {p.name for p in (run_dir / BACKUP_DIR / "fit").iterdir()} == {
        "state.json",
        f"weights-{EPOCHS}.weights.h5",
        f"weights-{EPOCHS - 1}.weights.h5",
        *best_files,
    }  # older epochs' files are pruned; the best epoch's weights are kept for early stopping
    assert _temp_files(run_dir) == []


def test_a_killed_fit_resumes_and_logs_each_epoch_once(tmp_path):
    run_dir = tmp_path / "run"
    callbacks = standard_callbacks(run_dir, tensorboard=False, early_stopping=False)
    callbacks.insert(-1, _CrashAtEpochEnd(2))  # after history and checkpoint, before the backup

    with pytest.raises(_Crash):
        _fit(_model(), callbacks, epochs=4)
    logged_before = read_history(run_dir)
    assert [r["epoch"] for r in logged_before] == [0, 1, 2]
    assert (run_dir / BACKUP_DIR / "fit").is_dir()

    history = _fit(_model(), standard_callbacks(run_dir, tensorboard=False, early_stopping=False), epochs=4)

    assert history.epoch == [2, 3]  # resumed after the last backed-up epoch, by a plain model.fit
    records = read_history(run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[:2] == logged_before[:2]
    assert records[2]["wall_time"] > logged_before[2]["wall_time"]  # the repeated epoch was re-logged
    assert [int(row["epoch"]) for row in _read_csv(run_dir / HISTORY_CSV)] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- HistoryLogger


OLD_RUN = [{"epoch": epoch, "loss": 1000.0 + epoch, "run": "old"} for epoch in range(4)]


@pytest.mark.parametrize("csv_log, jsonl_log", [(True, True), (True, False), (False, True)])
def test_history_logger_drops_epochs_a_resume_repeats(tmp_path, csv_log, jsonl_log):
    rundir.atomic_write_text(tmp_path / HISTORY_JSONL, "".join(json.dumps(r) + "\n" for r in OLD_RUN))
    rundir.atomic_write_text(tmp_path / HISTORY_CSV, rundir.records_to_csv(OLD_RUN))
    if not jsonl_log:
        (tmp_path / HISTORY_JSONL).unlink()
    if not csv_log:
        (tmp_path / HISTORY_CSV).unlink()
    logger = HistoryLogger(tmp_path, stage="finetune", csv_log=csv_log, jsonl_log=jsonl_log)

    _fit(_model(), [logger], initial_epoch=2, epochs=3)

    assert (tmp_path / HISTORY_JSONL).exists() is jsonl_log
    assert (tmp_path / HISTORY_CSV).exists() is csv_log
    if jsonl_log:
        records = read_history(tmp_path)
        assert [r["epoch"] for r in records] == [0, 1, 2]
        assert records[:2] == OLD_RUN[:2]
        assert records[2]["stage"] == "finetune"
        assert "run" not in records[2]
        assert records[2]["loss"] < 1000.0  # a value of this fit, not the old run's
    if csv_log:
        rows = _read_csv(tmp_path / HISTORY_CSV)
        assert [row["epoch"] for row in rows] == ["0", "1", "2"]
        assert [row["run"] for row in rows] == ["old", "old", ""]
        assert [row["stage"] for row in rows] == ["", "", "finetune"]


def test_csv_only_history_keeps_every_epoch(tmp_path):
    _fit(_model(), [HistoryLogger(tmp_path, jsonl_log=False)])

    rows = _read_csv(tmp_path / HISTORY_CSV)
    assert [row["epoch"] for row in rows] == [str(e) for e in range(EPOCHS)]
    assert not (tmp_path / HISTORY_JSONL).exists()


def test_history_logger_appends_across_two_fits(tmp_path):
    model = _model()
    _fit(model, [HistoryLogger(tmp_path, stage="head")], epochs=2)
    _fit(model, [HistoryLogger(tmp_path, stage="finetune")], initial_epoch=2, epochs=3)

    records = read_history(tmp_path)
    assert [(r["epoch"], r["stage"]) for r in records] == [(0, "head"), (1, "head"), (2, "finetune")]
    assert [row["stage"] for row in _read_csv(tmp_path / HISTORY_CSV)] == ["head", "head", "finetune"]


# --------------------------------------------------------------------------- BestModelCheckpoint


@pytest.fixture
def saves(monkeypatch):
    """Counts atomic_save_model calls instead of writing files."""
    calls = []
    monkeypatch.setattr(rundir, "atomic_save_model", lambda model, path: calls.append(Path(path)))
    return calls


def _saved_epochs(checkpoint: BestModelCheckpoint, saves: list, values: list[float]) -> list[int]:
    checkpoint.set_model(_model())
    saved = []
    for epoch, value in enumerate(values):
        before = len(saves)
        checkpoint.on_epoch_end(epoch, {checkpoint.monitor: value, "other": 123.0})
        if len(saves) > before:
            saved.append(epoch)
    return saved


@pytest.mark.parametrize(
    "monitor, mode, expected",
    [
        ("val_loss", "auto", "min"),
        ("loss", "auto", "min"),
        ("val_accuracy", "auto", "max"),
        ("val_sparse_categorical_accuracy", "auto", "max"),
        ("val_auc", "auto", "max"),
        ("val_loss", "max", "max"),
        ("val_accuracy", "min", "min"),
    ],
)
def test_checkpoint_mode(tmp_path, monitor, mode, expected):
    assert BestModelCheckpoint(tmp_path / BEST_MODEL, monitor=monitor, mode=mode).mode == expected


@pytest.mark.parametrize(
    "monitor, values, expected_saves, expected_best",
    [
        ("val_loss", [1.0, 0.5, 0.7, 0.4, 0.4], [0, 1, 3], 0.4),
        ("val_accuracy", [0.5, 0.4, 0.6, 0.6, 0.55], [0, 2], 0.6),
        ("val_loss", [float("nan"), 1.0, float("inf"), 0.9], [1, 3], 0.9),
    ],
)
def test_checkpoint_saves_only_on_improvement(tmp_path, saves, monitor, values, expected_saves, expected_best):
    checkpoint = BestModelCheckpoint(tmp_path / BEST_MODEL, monitor=monitor)

    assert _saved_epochs(checkpoint, saves, values) == expected_saves
    assert checkpoint.best == expected_best
    assert checkpoint.best_epoch == expected_saves[-1]
    assert set(saves) == {tmp_path / BEST_MODEL}


def test_checkpoint_keeps_a_better_best_passed_in(tmp_path, saves):
    checkpoint = BestModelCheckpoint(tmp_path / BEST_MODEL, best=0.3)

    assert _saved_epochs(checkpoint, saves, [0.5, 0.3, 0.4]) == []
    assert (checkpoint.best, checkpoint.best_epoch) == (0.3, None)
    assert _saved_epochs(checkpoint, saves, [0.2]) == [0]


def test_checkpoint_with_missing_monitor_warns_and_saves_nothing(tmp_path, saves, caplog):
    checkpoint = BestModelCheckpoint(tmp_path / BEST_MODEL, monitor="val_accuracy")
    checkpoint.set_model(_model())

    with caplog.at_level(logging.WARNING, logger=callbacks_lib.__name__):
        checkpoint.on_epoch_end(0, {"loss": 0.5, "val_loss": 0.4})

    assert saves == []
    assert checkpoint.best is None
    assert "'val_accuracy' is not among the logs ['loss', 'val_loss']" in caplog.text


def test_checkpoint_file_changes_only_when_the_model_improves(tmp_path):
    path = tmp_path / BEST_MODEL
    model = _model()
    checkpoint = BestModelCheckpoint(path)
    checkpoint.set_model(model)
    first_kernel = _kernel(model)

    checkpoint.on_epoch_end(0, {"val_loss": 1.0})
    first_bytes = path.read_bytes()
    model.layers[0].kernel.assign(first_kernel + 1.0)
    checkpoint.on_epoch_end(1, {"val_loss": 2.0})

    assert path.read_bytes() == first_bytes
    np.testing.assert_array_equal(_kernel(keras.saving.load_model(path)), first_kernel)

    checkpoint.on_epoch_end(2, {"val_loss": 0.5})

    np.testing.assert_array_equal(_kernel(keras.saving.load_model(path)), first_kernel + 1.0)
    assert _temp_files(tmp_path) == []


# --------------------------------------------------------------------------- NaNGuard


def test_nan_guard_stops_with_epoch_and_batch_and_keeps_the_last_good_files(tmp_path):
    run_dir = tmp_path / "run"
    model = _model()
    callbacks = standard_callbacks(run_dir, tensorboard=False) + [_PoisonWeightsAt(epoch=1)]

    with pytest.raises(TrainingDivergedError, match=r"loss became nan at epoch 2, batch 1;"):
        _fit(model, callbacks)

    assert [r["epoch"] for r in read_history(run_dir)] == [0]
    best = keras.saving.load_model(run_dir / BEST_MODEL)
    assert np.isfinite(_kernel(best)).all()
    x_val, y_val = _data(1)
    assert best.evaluate(x_val, y_val, verbose=0) == pytest.approx(read_history(run_dir)[0]["val_loss"], rel=1e-5)
    assert (run_dir / BACKUP_DIR / "fit").is_dir()  # the backup of epoch 1 is kept for a retry


def test_nan_guard_on_nan_inputs_names_the_first_bad_batch(tmp_path):
    x, y = _data(0)
    x[2 * BATCH_SIZE + 3, 0] = np.nan  # in the third batch of each epoch

    with pytest.raises(TrainingDivergedError, match=r"at epoch 1, batch 3;"):
        _model().fit(x, y, batch_size=BATCH_SIZE, epochs=2, shuffle=False, verbose=0, callbacks=[NaNGuard()])


def test_nan_guard_names_the_group_of_batches_under_steps_per_execution():
    x, y = _data(0)
    x[2 * BATCH_SIZE + 3, 0] = np.nan  # in the third batch: Keras reports batches 3-4 together
    model = keras.Sequential([keras.Input((NUM_FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse", steps_per_execution=2)

    with pytest.raises(TrainingDivergedError, match=r"at epoch 1, batches 3-4;"):
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0, callbacks=[NaNGuard()])


@pytest.mark.parametrize("known_length", [True, False])
def test_the_progress_bar_counts_the_steps_run_under_steps_per_execution(capsys, known_length):
    # 4 batches run 3 at a time: Keras' own bar shows "6/6" when the data set's length is unknown
    ds = tf.data.Dataset.from_tensor_slices(_data(0)).batch(BATCH_SIZE)
    if not known_length:
        ds = ds.filter(lambda x, y: True)
    model = keras.Sequential([keras.Input((NUM_FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse", steps_per_execution=3)

    model.fit(ds, epochs=2, verbose=1, callbacks=[ProgressBar()])

    shown = capsys.readouterr().out
    assert "3/4" in shown and "4/4" in shown and "6/" not in shown and "/6" not in shown


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_nan_guard_raises_on_non_finite_loss(loss):
    guard = NaNGuard()
    guard.on_epoch_begin(4)

    with pytest.raises(TrainingDivergedError, match=r"at epoch 5, batch 8;"):
        guard.on_train_batch_end(7, {"loss": loss})


@pytest.mark.parametrize("logs", [None, {}, {"loss": 0.25}, {"loss": np.float32(1e30)}, {"accuracy": 0.5}])
def test_nan_guard_lets_finite_or_missing_loss_pass(logs):
    NaNGuard().on_train_batch_end(0, logs)


# --------------------------------------------------------------------------- helpers


def test_current_learning_rate_of_a_constant_rate():
    assert current_learning_rate(_model(learning_rate=0.0125)) == pytest.approx(0.0125)


def test_current_learning_rate_without_optimizer_is_none():
    assert current_learning_rate(keras.Sequential([keras.Input((NUM_FEATURES,)), keras.layers.Dense(1)])) is None


def test_current_learning_rate_follows_a_schedule(tmp_path):
    initial, decay = 0.1, 0.9
    schedule = keras.optimizers.schedules.ExponentialDecay(initial, decay_steps=1, decay_rate=decay)
    model = _model(learning_rate=schedule)
    assert current_learning_rate(model) == pytest.approx(initial)

    _fit(model, [HistoryLogger(tmp_path)], epochs=2)

    lr = current_learning_rate(model)
    assert lr < initial
    assert lr == pytest.approx(initial * decay ** (2 * STEPS_PER_EPOCH), rel=1e-5)
    logged = [r["learning_rate"] for r in read_history(tmp_path)]
    assert logged == pytest.approx([initial * decay ** (e * STEPS_PER_EPOCH) for e in (1, 2)], rel=1e-5)
    assert not math.isclose(logged[0], logged[1])
