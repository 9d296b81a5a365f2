"""The user's own Keras callbacks (`train_and_evaluate(..., callbacks=[...])`, and through `tune` and
`compare`): called in every fit of a run, both stages of a fine-tune, after the package's own, and
never written into config.json."""

import json

import keras
import pytest
from conftest import smoke, staged

from kerastune_flow import rundir
from kerastune_flow.training import train


class Recorder(keras.callbacks.Callback):
    """Records every epoch end it sees: the epoch, the log keys, the model's name, and what the
    package had written by then (the epoch in history.jsonl, the epochs in the backup)."""

    def __init__(self, run_dir=None):
        super().__init__()
        self.run_dir = run_dir
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        run_dir = self.run_dir
        logged = [r["epoch"] for r in rundir.read_history(run_dir)] if run_dir else []
        backup = [rundir.read_json(path)["epoch"] for path in run_dir.glob("backup/*/state.json")] if run_dir else []
        self.seen.append(
            {"epoch": epoch, "keys": sorted(logs or {}), "model": self.model.name, "logged": logged, "backup": backup}
        )


def test_a_users_callback_sees_every_epoch_of_both_stages_after_the_package_wrote_it(
    folder, base_model, tmp_path, monkeypatch
):
    # One staged run checks both (a scratch run of its own cost 4 s more of the default suite).
    fits = []
    original = keras.Model.fit

    def recording_fit(self, *args, callbacks=None, **kwargs):
        fits.append([type(c).__name__ for c in callbacks or ()])
        return original(self, *args, callbacks=callbacks, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    run_dir = tmp_path / "run"
    recorder = Recorder(run_dir)
    config = staged(folder, base_model, head_epochs=1, epochs=1, patience=5)
    result = train.train_and_evaluate(config, run_dir, callbacks=[recorder])
    assert len(fits) == 2  # one fit a stage, the user's callback after the package's own in each
    assert all(fit[-3:] == ["RunBackup", "Recorder", "ProgressBar"] for fit in fits), fits
    assert [s["epoch"] for s in recorder.seen] == [0, 1]
    assert [r["stage"] for r in result.history] == ["head", "finetune"]
    # The frozen stage fits the head on cached features: there the callback's model is the head.
    assert [s["model"] for s in recorder.seen] == ["head", "unfrozen_part"]
    assert [s["logged"] for s in recorder.seen] == [[0], [0, 1]]  # HistoryLogger wrote the epoch first
    for seen in recorder.seen:
        assert seen["epoch"] + 1 in seen["backup"]  # and RunBackup backed it up
        assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(seen["keys"])
    saved = (run_dir / rundir.CONFIG_JSON).read_text()
    assert "Recorder" not in saved and "callbacks" not in json.loads(saved)["config"]["train"]


@pytest.mark.parametrize("bad", ["a string", keras.callbacks.History(), [keras.callbacks.History(), print]])
def test_callbacks_that_are_not_a_list_of_callbacks_are_refused_before_anything_runs(tmp_path, bad):
    with pytest.raises(TypeError, match="callbacks= takes"):
        train.train_and_evaluate(smoke("scratch_mlp", "digits"), tmp_path / "run", callbacks=bad)
    assert not (tmp_path / "run").exists()


def test_tune_and_compare_refuse_callbacks_that_are_not_a_list_before_writing(tmp_path):
    from kerastune_flow.search import compare as compare_lib
    from kerastune_flow.search import tune as tune_lib

    with pytest.raises(TypeError, match="callbacks= takes"):
        tune_lib.tune("scratch_mlp", tmp_path / "search", data="digits", callbacks=keras.callbacks.History())
    with pytest.raises(TypeError, match="callbacks= takes"):
        compare_lib.compare("digits", tmp_path / "cmp", callbacks=[print])
    assert not (tmp_path / "search").exists() and not (tmp_path / "cmp").exists()
