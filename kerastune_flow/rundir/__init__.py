"""The run directory: the files of a run, whose folder it is, writing it, one process at a time.

A run directory holds:

    config.json     the Config, class names, image shape, head, strategy, versions
    history.csv     one row per epoch (history.jsonl: the same as JSON lines)
    model.keras     the best model (by the monitored metric)
    results.json    test metrics, wall time, parameter counts, best epoch
    curves.png      loss and accuracy per epoch, the fine-tune boundary marked
    lr_find.json    with `--learning-rate auto`: the range test's curve and the rate it chose
                    (lr_find.png its plot; lr_find_finetune.* for `--finetune-learning-rate auto`)
    tensorboard/    TensorBoard event files
    backup/         the resume state (see `training/resume.py`); removed when the run finishes
    mlflow_run.json with `--track mlflow`: the run's MLflow run, which a resumed run continues
    .lock           while a command writes the folder: which process (see `lock.py`)

    files.py        the names above, and the history files
    writes.py       atomic writes (written beside, then renamed) and the errors of a write that failed
    claim.py        whose folder it is (`claim_dir`); creating, resuming and clearing a run's folder
    lock.py         one process per output folder: `run_lock(folder)` holds FOLDER/.lock
    unfinished.py   the folder of a command started without --run-dir: its unfinished one, or a new one

Every file is replaced atomically, so a kill at any moment leaves the previous complete version,
never a truncated one, with the mode the umask gives. The package writes only into a new or empty
folder or one it wrote (`claim_dir`). Every layer reads these files, so this package sits on the
floor beside `config`: it imports nothing of the package but `errors`.
"""

from kerastune_flow.rundir import lock, unfinished
from kerastune_flow.rundir.claim import (
    IGNORED_NAMES,
    KIND_MARKERS,
    KIND_WORDS,
    RUN_KINDS,
    claim_dir,
    clear_finished_run,
    folder_kind,
    is_finished,
    prepare_run_dir,
)
from kerastune_flow.rundir.files import (
    BACKUP_DIR,
    BEST_MODEL,
    CONFIG_JSON,
    CURVES_PNG,
    EXPORT_JSON,
    EXPORT_PREFIX,
    HISTORY_CSV,
    HISTORY_JSONL,
    LEARNING_RATES_JSON,
    LOCK_FILE,
    LR_FIND,
    RESULTS_JSON,
    RUN_FILES,
    TENSORBOARD_DIR,
    TRACKING_JSON,
    lr_find_paths,
    read_history,
    records_to_csv,
    write_history,
)
from kerastune_flow.rundir.lock import run_lock
from kerastune_flow.rundir.writes import (
    DISK_FULL_ERRNOS,
    DISK_FULL_TEXTS,
    atomic_file,
    atomic_save_model,
    atomic_write_json,
    atomic_write_text,
    free_space,
    is_disk_full,
    read_json,
    to_jsonable,
    umask,
    write_error,
)

__all__ = [
    "BACKUP_DIR",
    "BEST_MODEL",
    "CONFIG_JSON",
    "CURVES_PNG",
    "DISK_FULL_ERRNOS",
    "DISK_FULL_TEXTS",
    "EXPORT_JSON",
    "EXPORT_PREFIX",
    "HISTORY_CSV",
    "HISTORY_JSONL",
    "IGNORED_NAMES",
    "KIND_MARKERS",
    "KIND_WORDS",
    "LEARNING_RATES_JSON",
    "LOCK_FILE",
    "LR_FIND",
    "RESULTS_JSON",
    "RUN_FILES",
    "RUN_KINDS",
    "TENSORBOARD_DIR",
    "TRACKING_JSON",
    "atomic_file",
    "atomic_save_model",
    "atomic_write_json",
    "atomic_write_text",
    "claim_dir",
    "clear_finished_run",
    "folder_kind",
    "free_space",
    "is_disk_full",
    "is_finished",
    "lock",
    "lr_find_paths",
    "prepare_run_dir",
    "read_history",
    "read_json",
    "records_to_csv",
    "run_lock",
    "to_jsonable",
    "umask",
    "unfinished",
    "write_error",
    "write_history",
]
