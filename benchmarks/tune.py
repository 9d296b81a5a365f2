"""Issue 17's measurement of `tune`: the cat-vs-dog fine-tune searched by the package, and by plain
KerasTuner driving a hand-written fine-tune HyperModel with the same budget, offline.

The task is the README's (benchmarks/accuracy.py makes it): cat vs dog from the CIFAR-10 JPEG
folder, 2,000 training images (10 % held out for validation, seed 0), the 2,000 test images, and a
base pre-trained here on the other eight CIFAR-10 classes (`runs/cifar8_cnn`, cut at its layer
"dense"). Both searches are Bayesian optimisation over the same five knobs and ranges (learning_rate,
finetune_learning_rate, unfreeze_at, dropout, l2) with the same trials and seed, one after the other, each
started only when no other benchmark or test runs on the machine:

  package      `python -m kerastune_flow.run tune vgg16_finetune ...` as a subprocess; reads DIR/tune.json
  keras_tuner  `keras_tuner.BayesianOptimization` over `FineTuneHyperModel` below (in a subprocess of
               this script, so both clocks start at a fresh Python): stage 1 trains the head on the
               frozen base, stage 2 unfreezes from the trial's layer and recompiles at its rate

For each: when every trial ended (seconds since its process started) and the best validation
accuracy so far, the time each took to reach the best both reach, and the test accuracy of each
one's best model. Also the README's reference row (70.1 %, `--finetune-learning-rate 1e-4`), run again here on
this machine's base, and, after the searches, what limits the result (`diagnostics`): the package's
best replayed from its best_config.json, over three seeds, alone and with random flips and crops.

    python benchmarks/tune.py                                # both searches: 30 to 40 minutes on 2 CPU cores
    python benchmarks/tune.py --only package --trials 10
    python benchmarks/tune.py --only diagnostics             # after a package search: about 10 minutes
    python benchmarks/tune.py --only folds --max-minutes 15 --trials 100 --final-seeds 3   # issue 30: 35 minutes

Results go to benchmarks/tune_results.json (a run with --only keeps the other side's). Needs
../shared/datasets (the CIFAR-10 JPEG archive); not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import accuracy  # noqa: E402  (the CIFAR-10 folders: cat vs dog and the other eight classes)
import keras  # noqa: E402
import keras_tuner as kt  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kerastune_flow.data import load_data  # noqa: E402
from kerastune_flow.recipes import make_config  # noqa: E402
from kerastune_flow.search import tune_report  # noqa: E402
from kerastune_flow.search.tune_space import unfreeze_choices  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "tune_results.json"
PLOT = REPO / "docs" / "tune_catdog_race.png"
FOLDS_PLOT = REPO / "docs" / "tune_catdog_folds.png"
SEED = 0
TRIALS = 30  # the package: about 12 to 16 minutes here (15 to 35 s a trial); plain KerasTuner: longer
HEAD_EPOCHS, EPOCHS, PATIENCE = 40, 20, 5  # the README's cat-vs-dog row
BATCH_SIZE = 32
BASE_OUTPUT = "dense"  # the base's layer the head goes on (the old 8-class logits are dropped)
SPACE = ("learning_rate", "finetune_learning_rate", "unfreeze_at", "dropout", "l2")  # the recipe's default space
UNFREEZE_CHOICES = ("conv_1", "conv_2", "conv_3")  # tune_space.unfreeze_choices of this base (checked)
DENSE_UNITS = 256  # the transfer head's width (config.dense_units)
REFERENCE_ROW = "transfer_finetune"  # README: vgg16_finetune --base ... --finetune-learning-rate 1e-4, 70.1 %
PRETRAIN_ROW = "transfer_pretrain_8_classes"
AIM = 0.72
DIAGNOSTIC_AUGMENTS, DIAGNOSTIC_SEEDS = ("none", "flip", "crop,flip"), (0, 1, 2)
BUSY_PATTERNS = ("benchmarks/", "pytest")
POLL_SECONDS = 10
WAIT_REMINDER_SECONDS = 600
IDLE_CORES, IDLE_WINDOW_SECONDS, IDLE_MAX_WAIT_SECONDS = 0.15, 20, 1800
# A trial's log line (search/tune_report.trial_line): its number, objective, score (with --folds, the
# mean, then each fold's in parentheses) and wall seconds.
TRIAL_LINE = re.compile(r"Trial (\d+): .* -> (\w+) ([0-9.]+)(?: \(mean of [^)]*\))?, .*?; ([0-9.]+) s")


# --------------------------------------------------------------------------- the machine


def _family() -> set[int]:
    """This process, its ancestors and its descendants: their command lines name this script."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    family, pid = set(), os.getpid()
    while pid > 1:
        family.add(pid)
        pid = parents.get(pid, 1)
    grew = True
    while grew:
        children = {child for child, parent in parents.items() if parent in family and child not in family}
        family |= children
        grew = bool(children)
    return family


def busy() -> list[str]:
    """Other benchmarks and test runs now running on this machine ("PID command")."""
    mine, found = _family(), {}
    for pattern in BUSY_PATTERNS:
        out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, _, command = line.partition(" ")
            if pid.isdigit() and int(pid) not in mine:
                found[int(pid)] = command[:120]
    return [f"{pid} {command}" for pid, command in sorted(found.items())]


def cpu_seconds() -> tuple[float, float]:
    """(core-seconds the machine has been busy since boot, core-seconds this process and its
    finished children have used): their changes over a stretch give the others' share."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy_ticks = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy_ticks / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user and system, every thread) process `pid` has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def others_cores(seconds: float) -> float:
    """Cores kept busy by other processes over the next `seconds` (whatever their command line)."""
    machine_before, own_before = cpu_seconds()
    time.sleep(seconds)
    machine_after, own_after = cpu_seconds()
    return max(0.0, (machine_after - machine_before) - (own_after - own_before)) / seconds


def wait_until_idle(what: str) -> dict:
    """Waits until no other benchmark or test runs (`busy()`), then until other processes leave
    the cores free (below `IDLE_CORES` over `IDLE_WINDOW_SECONDS`; given up after
    `IDLE_MAX_WAIT_SECONDS`, and recorded). Returns the seconds waited and what was seen."""
    start, shown, told = time.monotonic(), None, 0.0
    quiet_from = None  # when no other benchmark or test was left
    while True:
        others = busy()
        if others:
            if others != shown or time.monotonic() - told > WAIT_REMINDER_SECONDS:  # on a change, else now and then
                print(f"[wait] before {what}: {len(others)} other run(s): {'; '.join(others)}", flush=True)
                shown, told = others, time.monotonic()
            quiet_from = None
            time.sleep(POLL_SECONDS)
            continue
        quiet_from = quiet_from or time.monotonic()
        cores = others_cores(IDLE_WINDOW_SECONDS)
        if (cores <= IDLE_CORES or time.monotonic() - quiet_from > IDLE_MAX_WAIT_SECONDS) and not busy():
            break
        if cores > IDLE_CORES:
            print(f"[wait] before {what}: other processes keep {cores:.2f} core(s) busy", flush=True)
    waited = time.monotonic() - start
    print(f"[wait] starting {what} after {waited / 60:.1f} min; others use {cores:.2f} core(s)", flush=True)
    return {"waited_seconds": round(waited), "others_cores_before": round(cores, 2)}


class Watch:
    """Notes every other benchmark or test run seen while a measured search runs (polled), and
    the CPU time all other processes took meanwhile."""

    def __init__(self, seconds: float = 5.0):
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(seconds,), daemon=True)

    def _poll(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            for other in busy():
                self.seen[other] = self.seen.get(other, 0.0) + seconds

    def __enter__(self) -> Watch:
        self._start = (time.monotonic(), *cpu_seconds())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._end = (time.monotonic(), *cpu_seconds())

    def record(self) -> dict:
        (t0, machine0, own0), (t1, machine1, own1) = self._start, self._end
        others = max(0.0, (machine1 - machine0) - (own1 - own0))
        return {
            "others_seen": [{"process": k, "seconds_about": round(v)} for k, v in self.seen.items()],
            "others_cpu_seconds": round(others, 1),  # every other process's CPU time during the search
            "others_cores_mean": round(others / (t1 - t0), 3),
            "own_cpu_seconds": round(own1 - own0, 1),  # the search's (and this script's) CPU time
        }


# --------------------------------------------------------------------------- data, base, reference


def prepare(work: Path) -> dict:
    """The folders and the pre-trained base (accuracy.py's row, when absent); the README's reference
    fine-tune run again on this base. Returns what was run and measured."""
    _, _, pair = accuracy._prepare_folders(work)
    base = work / "runs" / "cifar8_cnn"
    rows_out = work / "accuracy_rows.json"  # accuracy.py's own results file is left alone
    rows = json.loads(rows_out.read_text()) if rows_out.exists() else {}
    for name, present in ((PRETRAIN_ROW, (base / "model.keras").exists()), (REFERENCE_ROW, REFERENCE_ROW in rows)):
        if present:
            continue
        wait_until_idle(name)
        command = [sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--work", str(work)]
        subprocess.run([*command, "--only", name, "--out", str(rows_out)], cwd=REPO, check=True)
        rows = json.loads(rows_out.read_text())
    readme = json.loads((REPO / "benchmarks" / "accuracy_results.json").read_text())
    return {
        "data": str(pair),
        "base": str(base),
        "base_row_here": rows.get(PRETRAIN_ROW, "pre-trained by an earlier run of this script or accuracy.py"),
        "reference_readme": {**readme[REFERENCE_ROW], "source": "benchmarks/accuracy_results.json"},
        "reference_here": rows[REFERENCE_ROW],
    }


# --------------------------------------------------------------------------- the package


def package_command(work: Path, run_dir: Path, args: argparse.Namespace, folds: int | None = None) -> list[str]:
    command = ["tune", "vgg16_finetune", "--data", str(work / "catdog2000"), "--base", str(work / "runs/cifar8_cnn")]
    command += ["--base-output", BASE_OUTPUT, "--head-epochs", str(HEAD_EPOCHS), "--epochs", str(EPOCHS)]
    command += ["--patience", str(PATIENCE), "--seed", str(SEED), "--trials", str(args.trials)]
    command += ["--space", ",".join(SPACE), "--no-tensorboard", "--quiet", "--run-dir", str(run_dir)]
    command += ["--folds", str(args.folds if folds is None else folds)]  # 1: one hold-out, as the table's row
    command += ["--final-seeds", str(args.final_seeds)]
    if args.max_minutes:
        command += ["--max-minutes", str(args.max_minutes)]
    return command


def run_package(work: Path, args: argparse.Namespace, name: str = "tune_package", folds: int | None = None) -> dict:
    """The package's search through its CLI (in `work/runs/NAME`, `folds` a trial or `args.folds`);
    each trial's end is stamped as its log line arrives."""
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh search, not a resumed one
    command = package_command(work, run_dir, args, folds)
    shown = "python -m kerastune_flow.run " + " ".join(shlex.quote(a) for a in command)
    waited = wait_until_idle(f"the package's search ({name})")
    print(f"\n$ {shown.replace(str(work), '$WORK')}", flush=True)
    ended, cpu, seconds, best = {}, {}, {}, 0.0
    with Watch() as watch, open(work / "runs" / f"{name}.log", "w") as log:
        start = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "kerastune_flow.run", *command],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in proc.stderr:
            log.write(line)
            match = TRIAL_LINE.search(line)
            if match:
                at, value = time.time() - start, float(match.group(3))
                ended[match.group(1)], seconds[match.group(1)] = round(at, 1), float(match.group(4))
                cpu[match.group(1)] = process_cpu_seconds(proc.pid)
                best = max(best, value)
                print(
                    f"[package] trial {match.group(1)} ended at {at:6.1f} s: {value:.4f} (best {best:.4f})", flush=True
                )
        stdout = proc.stdout.read()
        proc.wait()
        wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shown}; see {work / 'runs' / f'{name}.log'}")
    print(stdout.strip(), flush=True)
    summary = json.loads((run_dir / "tune.json").read_text())
    oracle_seed = json.loads((run_dir / "keras_tuner" / "oracle.json").read_text())["seed"]
    trials = [
        {
            "trial": t["trial"],
            "hyperparameters": t["hyperparameters"],
            "val_accuracy": t["objective"],
            "seconds": seconds.get(t["trial"]),  # the whole trial, as its log line says
            "train_seconds": t["seconds"],  # the two fits alone (results.json)
            "epochs_run": t["epochs_run"],
            "folds": [f["objective"] for f in t.get("folds") or []],  # each fold's score (with --folds)
            "ended_at": ended.get(t["trial"]),
            "cpu_at_end": cpu.get(t["trial"]),  # the search process's CPU seconds when the trial ended
            "status": t["status"],
        }
        for t in summary["trials"]
    ]
    best_dir = Path(summary["best"]["run_dir"])
    best_results = json.loads((best_dir / "results.json").read_text())
    history = [json.loads(line) for line in (best_dir / "history.jsonl").read_text().splitlines()]
    kept = history[best_results["best_epoch"] - 1]  # the epoch model.keras holds: the best val_loss
    return {
        "command": shown.replace(str(work), "$WORK"),
        **waited,
        **watch.record(),
        "wall_seconds": round(wall, 1),
        "search_seconds": summary["seconds"],
        "oracle_seed": oracle_seed,  # KerasTuner's: `seed or random.randint(1, 10000)`, so --seed 0 gives a random one
        "trials": _with_best_so_far(trials),
        "best": {
            "trial": summary["best"]["trial"],
            "hyperparameters": summary["best"]["hyperparameters"],
            "val_accuracy": summary["best"]["objective"],
            "kept_epoch": best_results["best_epoch"],
            "kept_epoch_val_accuracy": kept["val_accuracy"],
            "test_accuracy": summary["test"]["best"]["accuracy"],
        },
        "defaults": {
            "trial": summary["trials"][0]["trial"],
            "hyperparameters": summary["trials"][0]["hyperparameters"],
            "val_accuracy": summary["defaults"]["objective"],
            "test_accuracy": summary["test"]["defaults"]["accuracy"],
            "run_dir": summary["defaults"]["run_dir"].replace(str(work), "$WORK"),
            "is_first_trial": summary["defaults"]["run_dir"] == summary["trials"][0]["run_dir"],
        },
        "folds": summary.get("folds", 1),
        "test_seeds": _seeds(summary),
    }


def _seeds(summary: dict) -> dict | None:
    """The best's and the defaults' test accuracy with each final seed, their paired difference and
    the package's sentence on it (`tune --final-seeds`)."""
    seeds = summary.get("test_seeds")
    if not seeds:
        return None
    return {
        "seeds": seeds["seeds"],
        "best": [m["accuracy"] for m in seeds["best"]],
        "defaults": [m["accuracy"] for m in seeds["defaults"]],
        "difference": seeds["accuracy"],
        "sentence": tune_report.seeds_sentence(seeds),
    }


def _with_best_so_far(trials: list[dict]) -> list[dict]:
    best = None
    for trial in sorted(trials, key=lambda t: (t["ended_at"] is None, t["ended_at"] or 0)):
        if trial["val_accuracy"] is not None:
            best = trial["val_accuracy"] if best is None else max(best, trial["val_accuracy"])
        trial["best_so_far"] = best
    return trials


# --------------------------------------------------------------------------- folds against one hold-out


def folds_race(work: Path, args: argparse.Namespace) -> dict:
    """Issue 30's measurement: the package's search with one hold-out and with `args.folds` folds a
    trial (5 unless given), one after the other at the same `--max-minutes`, each ending with the
    best and the defaults trained on the whole training split over `--final-seeds` seeds and
    evaluated once on the test split. Then what the folds' best gained: over the defaults (paired by
    seed) and over the hold-out search's best (the seeds' means)."""
    folds = args.folds if args.folds > 1 else 5
    sides = {
        "hold_out": run_package(work, args, "tune_hold_out", folds=1),
        "folds": run_package(work, args, f"tune_folds{folds}", folds=folds),
    }
    means = {name: float(np.mean(side["test_seeds"]["best"])) for name, side in sides.items()}
    gain = sides["folds"]["test_seeds"]["difference"]
    return {
        "settings": {"folds": folds, "max_minutes": args.max_minutes, "trials_cap": args.trials},
        **sides,
        "verdict": {
            "folds_best_minus_defaults_points": round(100 * gain["mean"], 2),
            "folds_best_minus_defaults_within_noise": gain["within_noise"],
            "folds_best_minus_hold_out_best_points": round(100 * (means["folds"] - means["hold_out"]), 2),
            "best_test_mean": means,
            "aim_met": bool(100 * gain["mean"] >= 2 and means["folds"] > means["hold_out"]),
        },
    }


def plot_folds(race: dict, path: Path) -> None:
    """Left: the best validation score so far against the wall clock, both searches. Right: test
    accuracy of each search's best and of the defaults, one dot a seed, a bar at their mean."""
    figure = Figure(figsize=(10, 4), dpi=110)
    clock, tests = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    labels = {"hold_out": "one hold-out (200 images)", "folds": f"{race['settings']['folds']} folds (mean)"}
    for name, label in labels.items():
        trials = sorted((t for t in race[name]["trials"] if t["ended_at"] is not None), key=lambda t: t["ended_at"])
        clock.step(
            [t["ended_at"] / 60 for t in trials],
            [t["best_so_far"] for t in trials],
            where="post",
            marker="o",
            markersize=3,
            label=f"{label}: {len(trials)} trials",
        )
    clock.set_xlabel("minutes since the search started")
    clock.set_ylabel("best validation accuracy so far")
    clock.grid(alpha=0.3)
    clock.legend(loc="lower right", fontsize=8)
    columns = [("hold_out", "defaults"), ("hold_out", "best"), ("folds", "defaults"), ("folds", "best")]
    for x, (name, which) in enumerate(columns):
        values = [100 * v for v in race[name]["test_seeds"][which]]
        tests.scatter([x] * len(values), values, color="C0" if which == "best" else "grey", zorder=3)
        tests.hlines(np.mean(values), x - 0.3, x + 0.3, color="black")
    tests.set_xticks(range(len(columns)), [f"{'hold-out' if n == 'hold_out' else 'folds'}\n{w}" for n, w in columns])
    tests.set_ylabel(f"test accuracy, % ({len(race['folds']['test_seeds']['seeds'])} seeds, whole training split)")
    tests.grid(alpha=0.3, axis="y")
    figure.suptitle(f"Cat vs dog fine-tune search, {race['settings']['max_minutes']:g} minutes each, 2 CPU cores")
    figure.tight_layout()
    figure.savefig(path)


# --------------------------------------------------------------------------- plain KerasTuner


def run_keras_tuner(work: Path, args: argparse.Namespace, oracle_seed: int) -> dict:
    """Plain KerasTuner's search, in a fresh Python like the package's (see `keras_tuner_search`),
    its oracle seeded with `oracle_seed`: the seed the package's oracle ran with, so that both draw
    the same random trials."""
    out_dir = work / "runs" / "tune_keras_tuner"
    command = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--trials", str(args.trials)]
    command += ["--oracle-seed", str(oracle_seed), "--keras-tuner-search", str(out_dir)]
    if args.max_minutes:
        command += ["--max-minutes", str(args.max_minutes)]
    waited = wait_until_idle("plain KerasTuner's search")
    shown = f"python benchmarks/tune.py --trials {args.trials} --oracle-seed {oracle_seed} --keras-tuner-search "
    print(f"\n$ {shown}$WORK/runs/tune_keras_tuner", flush=True)
    with Watch() as watch, open(work / "runs" / "tune_keras_tuner.log", "w") as log:
        start = time.time()
        proc = subprocess.run(command, cwd=REPO, stderr=log)
        wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): plain KerasTuner; see {work / 'runs' / 'tune_keras_tuner.log'}")
    result = json.loads((out_dir / "result.json").read_text())
    for trial in result["trials"]:
        trial["ended_at"] = round(trial.pop("ended_time") - start, 1)
    result["search_started_at"] = round(result.pop("search_started_time") - start, 1)
    return {**waited, **watch.record(), "wall_seconds": round(wall, 1), **result}


class FineTuneHyperModel(kt.HyperModel):
    """The staged fine-tune as a KerasTuner user writes it: the base cut at `BASE_OUTPUT` and frozen
    under Dense(256, ReLU) -> Dropout -> Dense(1, sigmoid) (the package's transfer head for two
    classes); `fit` trains the head, then unfreezes from the trial's layer and trains on at the
    trial's fine-tune rate. Both stages stop early on val_loss and keep their best weights.

    Args:
        base_path: the pre-trained model's .keras file.
    """

    def __init__(self, base_path: Path):
        super().__init__(name="finetune")
        self.base_path = base_path

    def build(self, hp):
        learning_rate = hp.Float("learning_rate", 1e-4, 1e-2, sampling="log", default=1e-3)
        hp.Float("finetune_lr", 1e-6, 1e-4, sampling="log", default=1e-5)
        hp.Choice("unfreeze_at", list(UNFREEZE_CHOICES), default=UNFREEZE_CHOICES[-1])
        dropout = hp.Float("dropout", 0.0, 0.5, step=0.1, default=0.0)
        l2 = hp.Choice("l2", [0.0, 1e-5, 1e-4, 1e-3], default=0.0)
        keras.utils.set_random_seed(SEED)  # every trial starts from the same draw, as the package's do
        saved = keras.saving.load_model(self.base_path)
        base = keras.Model(saved.inputs, saved.get_layer(BASE_OUTPUT).output, name="base")
        base.trainable = False
        inputs = keras.Input(shape=base.input_shape[1:])
        x = base(inputs, training=False)
        regularizer = keras.regularizers.L2(l2) if l2 else None
        x = keras.layers.Dense(DENSE_UNITS, activation="relu", kernel_regularizer=regularizer)(x)
        x = keras.layers.Dropout(dropout)(x)
        outputs = keras.layers.Dense(1, activation="sigmoid")(x)
        model = keras.Model(inputs, outputs)
        model.compile(keras.optimizers.Adam(learning_rate), loss="binary_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, hp, model, *args, callbacks=(), **kwargs):
        def stop():
            return keras.callbacks.EarlyStopping("val_loss", patience=PATIENCE, restore_best_weights=True)

        head = model.fit(*args, epochs=HEAD_EPOCHS, callbacks=[*callbacks, stop()], **kwargs)
        base = model.get_layer("base")
        base.trainable = True
        first = [layer.name for layer in base.layers].index(hp.get("unfreeze_at"))
        for i, layer in enumerate(base.layers):
            layer.trainable = i >= first
        optimizer = keras.optimizers.Adam(hp.get("finetune_lr"))
        model.compile(optimizer, loss="binary_crossentropy", metrics=["accuracy"])  # trainable takes effect here
        start = len(head.epoch)
        tuned = model.fit(*args, initial_epoch=start, epochs=start + EPOCHS, callbacks=[*callbacks, stop()], **kwargs)
        for key, values in head.history.items():  # one history over both stages: the tuner takes its best epoch
            tuned.history[key] = values + tuned.history.get(key, [])
        return tuned


class TimedSearch(kt.BayesianOptimization):
    """KerasTuner's Bayesian search, noting when each trial ends (instrumentation, not the user's
    code) and starting no trial after `max_minutes`."""

    def __init__(self, *args, max_minutes: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []
        self.started = time.time()
        self.max_minutes = max_minutes

    def on_trial_begin(self, trial):
        self.began = time.perf_counter()
        super().on_trial_begin(trial)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        scores = [r["val_accuracy"] for r in self.records] + [trial.score]
        best = max((score for score in scores if score is not None), default=None)
        self.records.append(
            {
                "trial": trial.trial_id,
                "hyperparameters": dict(trial.hyperparameters.values),
                "val_accuracy": trial.score,
                "seconds": round(time.perf_counter() - self.began, 1),
                "ended_time": time.time(),
                "cpu_at_end": round(sum(os.times()[:2]), 2),  # this process's CPU seconds, every thread
                "status": str(trial.status),
                "best_so_far": best,
            }
        )
        print(f"[keras_tuner] trial {trial.trial_id} ended: {trial.score} (best {best})", flush=True)

    def pre_create_trial(self):
        if self.max_minutes and time.time() - self.started >= 60 * self.max_minutes:
            self.oracle.max_trials = len(self.oracle.trials)


def keras_tuner_search(work: Path, out_dir: Path, trials: int, max_minutes: float | None, oracle_seed: int) -> int:
    """The child process of `run_keras_tuner`: the search and the best model's test accuracy.

    The images are the package's split (`load_data` with the same fraction and seed: the same 1,800
    training and 200 validation files, decoded as `keras.utils.image_dataset_from_directory` does),
    held as numpy arrays, as a KerasTuner user passes them to `search`."""
    base_dir = work / "runs" / "cifar8_cnn"
    config = make_config("vgg16_finetune", data=str(work / "catdog2000"), base=str(base_dir), base_output=BASE_OUTPUT)
    if tuple(unfreeze_choices(config)) != UNFREEZE_CHOICES:  # the package's choices for this base
        raise SystemExit(f"unfreeze_choices differ: {unfreeze_choices(config)} != {UNFREEZE_CHOICES}")
    splits = load_data(str(work / "catdog2000"), image_size=(32, 32), channels=3, validation_fraction=0.1, seed=SEED)
    arrays = {}
    for name in ("train", "validation", "test"):
        images, labels = zip(*getattr(splits, name).as_numpy_iterator(), strict=True)
        arrays[name] = (np.stack(images), np.asarray(labels, "float32")[:, None])
    tuner = TimedSearch(
        FineTuneHyperModel(base_dir / "model.keras"),
        objective="val_accuracy",
        max_trials=trials,
        seed=oracle_seed,
        directory=str(out_dir),
        project_name="keras_tuner",
        overwrite=True,
        max_minutes=max_minutes,
    )
    tuner.search(*arrays["train"], validation_data=arrays["validation"], batch_size=BATCH_SIZE, verbose=0)
    search_seconds = time.time() - tuner.started
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best_model = tuner.get_best_models(1)[0]
    test = best_model.evaluate(*arrays["test"], batch_size=BATCH_SIZE, verbose=0, return_dict=True)
    result = {
        "command": "keras_tuner.BayesianOptimization(FineTuneHyperModel(), objective='val_accuracy', "
        f"max_trials={trials}, seed={oracle_seed}).search(x, y, validation_data=(xv, yv), batch_size={BATCH_SIZE})",
        "oracle_seed": tuner.oracle.seed,
        "sizes": {name: len(a[0]) for name, a in arrays.items()},
        "search_started_time": tuner.started,
        "search_seconds": round(search_seconds, 1),
        "trials": tuner.records,
        "best": {
            "trial": best_trial.trial_id,
            "hyperparameters": dict(best_trial.hyperparameters.values),
            "val_accuracy": best_trial.score,
            "test_accuracy": float(test["accuracy"]),
        },
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"[keras_tuner] best trial {best_trial.trial_id}: {best_trial.score:.4f}; test {test['accuracy']:.4f}")
    return 0


# --------------------------------------------------------------------------- what limits the result


def diagnostics(work: Path) -> dict:
    """After the searches: the package's best trial replayed from DIR/best_config.json (is it the same
    model?), then the same settings over seeds 0-2, alone and with random flips or crops and flips
    (augmentation is not in the recipe's space: each trial would pay the augmented-view pass).
    Accuracy only: not timed, so run without waiting."""
    tune_dir = work / "runs" / "tune_package"
    best = json.loads((tune_dir / "best_config.json").read_text())
    trial_results = json.loads((tune_dir / "trials" / f"{int(best['trial']):03d}" / "results.json").read_text())
    config = ["vgg16_finetune", "--config", str(tune_dir / "best_config.json"), "--no-tensorboard", "--quiet"]
    (work / "runs" / "tune_diagnostics").mkdir(parents=True, exist_ok=True)
    rows = {}
    for augment in DIAGNOSTIC_AUGMENTS:
        for seed in DIAGNOSTIC_SEEDS:
            name = f"best_{augment.replace(',', '_')}_s{seed}"
            extra = ["--seed", str(seed)] + (["--augment", augment] if augment != "none" else [])
            run_dir = work / "runs" / "tune_diagnostics" / name
            result, seconds, shown = accuracy._cli(
                [*config, *extra, "--run-dir", str(run_dir)], run_dir.with_suffix(".log")
            )
            rows[name] = {
                "command": shown.replace(str(work), "$WORK"),
                "test_accuracy": result["test"]["accuracy"],
                "epochs_run": result["epochs_run"],
                "train_seconds": result["train_seconds"],
                "weights_sha256": result["weights_sha256"],
            }
            print(f"[diagnostics] {name}: test {result['test']['accuracy']:.4f}", flush=True)
    replay = rows["best_none_s0"]
    by_augment = {}
    for augment in DIAGNOSTIC_AUGMENTS:
        values = [rows[f"best_{augment.replace(',', '_')}_s{seed}"]["test_accuracy"] for seed in DIAGNOSTIC_SEEDS]
        by_augment[augment] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return {
        "replay_same_weights": replay["weights_sha256"] == trial_results["weights_sha256"],
        "replay_test_accuracy": replay["test_accuracy"],
        "test_accuracy_by_augment": by_augment,
        "runs": rows,
    }


# --------------------------------------------------------------------------- the comparison


def time_to_reach(side: dict, target: float, clock: str = "ended_at") -> float | None:
    """From the process's start to the end of the first trial whose best so far reaches `target`:
    wall-clock seconds ("ended_at") or the process's CPU seconds ("cpu_at_end")."""
    for trial in sorted(side["trials"], key=lambda t: t["ended_at"]):
        if trial["best_so_far"] is not None and trial["best_so_far"] >= target - 1e-9:
            return trial[clock]
    return None


def compare(results: dict) -> dict | None:
    if "package" not in results or "keras_tuner" not in results:
        return None
    sides = {name: results[name] for name in ("package", "keras_tuner")}
    common = min(side["best"]["val_accuracy"] for side in sides.values())
    return {
        "common_best_val_accuracy": common,
        "seconds_to_common_best": {name: time_to_reach(side, common) for name, side in sides.items()},
        "cpu_seconds_to_common_best": {name: time_to_reach(side, common, "cpu_at_end") for name, side in sides.items()},
        "aim_reached": {name: side["best"]["test_accuracy"] >= AIM for name, side in sides.items()},
    }


def plot(results: dict, path: Path) -> None:
    """The best validation accuracy so far against the wall clock, both searches on one plot."""
    figure = Figure(figsize=(7, 4), dpi=110)
    ax = figure.add_subplot()
    for name, label in (("package", "kerastune_flow tune"), ("keras_tuner", "plain KerasTuner HyperModel")):
        trials = sorted(results[name]["trials"], key=lambda t: t["ended_at"])
        minutes = [0.0] + [t["ended_at"] / 60 for t in trials]
        best = [None] + [t["best_so_far"] for t in trials]
        ax.step(minutes[1:], best[1:], where="post", marker="o", markersize=3, label=label)
    common = results["comparison"]["common_best_val_accuracy"]
    ax.axhline(common, color="grey", linestyle=":", linewidth=1, label=f"best both reach ({common:.3f})")
    ax.set_xlabel("minutes since the process started")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_title(f"Cat vs dog fine-tune, {results['settings']['trials']} trials each, 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def print_table(results: dict) -> None:
    print(f"\n# {results['hardware']}")
    comparison = results.get("comparison") or {}
    wall, cpu = comparison.get("seconds_to_common_best", {}), comparison.get("cpu_seconds_to_common_best", {})
    print(f"\ncommon best validation accuracy: {comparison.get('common_best_val_accuracy', '-')}")
    print(
        "| search | trials | minutes | best val accuracy | minutes (CPU minutes) to the common best | "
        "test accuracy of the best | other processes' cores |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in ("package", "keras_tuner"):
        side = results.get(name)
        if not side:
            continue
        done = sum(t["status"] == "COMPLETED" for t in side["trials"])
        to_common = f"{wall[name] / 60:.1f} ({cpu[name] / 60:.1f})" if wall.get(name) is not None else "-"
        print(
            f"| {name} | {done} | {side['wall_seconds'] / 60:.1f} | {side['best']['val_accuracy']:.4f} | {to_common} | "
            f"{100 * side['best']['test_accuracy']:.2f} % | {side['others_cores_mean']:.2f} |"
        )
    if "package" in results:
        d = results["package"]["defaults"]
        print(f"\npackage's defaults trial (finetune_learning_rate 1e-5): test {100 * d['test_accuracy']:.2f} %")
    setup = results["setup"]
    for key in ("reference_readme", "reference_here"):
        print(f"{key} (--finetune-learning-rate 1e-4): test {100 * setup[key]['test_accuracy']:.2f} %")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/kerastune_flow_accuracy", help="scratch folder for data and runs")
    parser.add_argument("--trials", type=int, default=TRIALS, help=f"trials of each search (default {TRIALS})")
    parser.add_argument("--max-minutes", type=float, help="also stop starting trials after this many minutes")
    parser.add_argument("--folds", type=int, default=1, help="the package's search: folds a trial (default 1)")
    parser.add_argument(
        "--only",
        choices=("package", "keras_tuner", "diagnostics", "folds"),
        help="one part (the others' results are kept); folds: one hold-out against --folds (5) at --max-minutes",
    )
    parser.add_argument("--final-seeds", type=int, default=1, help="the package's: seeds of the best and defaults")
    parser.add_argument("--folds-plot", default=str(FOLDS_PLOT), help="with --only folds: its plot, as a PNG")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--plot", default=str(PLOT), help="the race of the two searches, as a PNG")
    parser.add_argument("--keras-tuner-search", metavar="DIR", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--oracle-seed", type=int, help=argparse.SUPPRESS)  # the child's: the package's oracle seed
    args = parser.parse_args(argv)
    work = Path(args.work)
    if args.keras_tuner_search:
        seed = SEED if args.oracle_seed is None else args.oracle_seed
        return keras_tuner_search(work, Path(args.keras_tuner_search), args.trials, args.max_minutes, seed)
    if not accuracy.SHARED.is_dir():
        print(f"{accuracy.SHARED} is absent: these runs need the CIFAR-10 JPEG archive.", file=sys.stderr)
        return 2
    print(f"# {machine.describe()}", flush=True)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update(
        issue=17,
        date=time.strftime("%Y-%m-%d"),
        hardware=machine.describe(),
        cpu={"model": machine.cpu_model(), "flags": machine.cpu_flags(), "cores": os.cpu_count()},
        versions=machine.versions(),
        settings={
            "trials": args.trials,
            "max_minutes": args.max_minutes,
            "seed": SEED,
            "space": list(SPACE),
            "head_epochs": HEAD_EPOCHS,
            "epochs": EPOCHS,
            "patience": PATIENCE,
            "batch_size": BATCH_SIZE,
            "image_size": [32, 32],
        },
        setup=prepare(work),
    )
    if args.only == "folds":
        if not args.max_minutes:
            parser.error("--only folds races the two searches at one budget: give --max-minutes")
        results["folds_race"] = folds_race(work, args)
        out.write_text(json.dumps(results, indent=2) + "\n")
        plot_folds(results["folds_race"], Path(args.folds_plot))
        print(json.dumps(results["folds_race"]["verdict"], indent=2))
        for name in ("hold_out", "folds"):
            print(f"{name}: {results['folds_race'][name]['test_seeds']['sentence']}")
        return 0
    if args.only in (None, "package"):
        results["package"] = run_package(work, args)
        results["comparison"] = compare(results)
        out.write_text(json.dumps(results, indent=2) + "\n")
    if args.only in (None, "keras_tuner"):
        oracle_seed = results.get("package", {}).get("oracle_seed", SEED)
        results["keras_tuner"] = run_keras_tuner(work, args, oracle_seed)
        results["comparison"] = compare(results)
        out.write_text(json.dumps(results, indent=2) + "\n")
    if args.only in (None, "diagnostics"):
        results["diagnostics"] = diagnostics(work)
        out.write_text(json.dumps(results, indent=2) + "\n")
    if results.get("comparison"):
        plot(results, Path(args.plot))
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
