"""The names of a run's files, and its history files (history.csv and history.jsonl)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from kerastune_flow.rundir.writes import atomic_write_text, to_jsonable

CONFIG_JSON = "config.json"
RESULTS_JSON = "results.json"
CURVES_PNG = "curves.png"
BEST_MODEL = "model.keras"
HISTORY_CSV = "history.csv"
HISTORY_JSONL = "history.jsonl"
BACKUP_DIR = "backup"
TENSORBOARD_DIR = "tensorboard"
LR_FIND = "lr_find"  # lr_find.json and lr_find.png: a range test's record and plot (see `lr_find_paths`)
LEARNING_RATES_JSON = "learning_rates.json"  # under backup/: the rates "auto" found, for a resumed run
# `export` writes RUN_DIR/export-FORMAT[-QUANTIZE] by default, each folder with this record in it.
EXPORT_PREFIX = "export-"
EXPORT_JSON = "export.json"
LOCK_FILE = ".lock"  # while a command writes the folder: who (see `rundir/lock.py`)
# With --track mlflow: the MLflow run of a run, search or comparison folder (its ID, experiment and store),
# so that the same command continues that MLflow run (see `training/tracking.py`).
TRACKING_JSON = "mlflow_run.json"
RUN_FILES = (
    CONFIG_JSON,
    RESULTS_JSON,
    CURVES_PNG,
    BEST_MODEL,
    HISTORY_CSV,
    HISTORY_JSONL,
    BACKUP_DIR,
    TENSORBOARD_DIR,
    TRACKING_JSON,
    *(f"{LR_FIND}{part}.{ext}" for part in ("", "_finetune") for ext in ("json", "png")),
)


def lr_find_paths(run_dir: str | os.PathLike, stage: str | None = None) -> tuple[Path, Path]:
    """The JSON record and the plot of a range test in `run_dir`: lr_find.json / .png, or for a
    stage other than the first fit's ("finetune"), lr_find_finetune.json / .png."""
    stem = LR_FIND if stage in (None, "head") else f"{LR_FIND}_{stage}"
    return Path(run_dir) / f"{stem}.json", Path(run_dir) / f"{stem}.png"


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The epochs logged so far, one dict each: from history.jsonl, or from history.csv when
    JSON-lines logging is off; [] when neither exists yet."""
    run_dir = Path(run_dir)
    jsonl = run_dir / HISTORY_JSONL
    if jsonl.exists():
        with open(jsonl, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    path = run_dir / HISTORY_CSV
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: _parse_cell(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _parse_cell(text: str) -> Any:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def write_history(
    run_dir: str | os.PathLike, records: list[dict[str, Any]], *, csv_log: bool = True, jsonl_log: bool = True
) -> None:
    """Replaces history.csv and/or history.jsonl with `records`, atomically."""
    run_dir = Path(run_dir)
    if jsonl_log:
        atomic_write_text(run_dir / HISTORY_JSONL, "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))
    if csv_log:
        atomic_write_text(run_dir / HISTORY_CSV, records_to_csv(records))


def records_to_csv(records: list[dict[str, Any]]) -> str:
    """CSV text with the union of keys as header, in first-seen order."""
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()
