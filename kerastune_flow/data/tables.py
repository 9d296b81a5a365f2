"""A CSV or TSV file of image paths and labels, with an optional split column, as an `ImageIndex`.

    path,label,split
    images/0001.jpg,grey cat,train
    images/0002.jpg,crème brûlée,valid

Paths are relative to the file's folder (absolute ones are kept). The columns are found by name
(`PATH_COLUMNS`, `LABEL_COLUMNS`, `SPLIT_COLUMNS`, in any case) unless `--csv-columns` names them.
Split values are train, valid/val/validation or test (fastai's `is_valid` column: true/false);
the splits the file does not have are carved from train as for a folder (`folders.split_index`).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from kerastune_flow.data.images import TIFF_EXTENSIONS, refuse_tiff
from kerastune_flow.data.sources import VALIDATION_NAMES, ImageIndex, nfc
from kerastune_flow.errors import DataError

log = logging.getLogger(__name__)

TABLE_EXTENSIONS = (".csv", ".tsv")
PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "file_name", "image", "image_path", "img")
LABEL_COLUMNS = ("label", "class", "class_name", "category", "target", "labels")
SPLIT_COLUMNS = ("split", "set", "subset", "is_valid")
SPLIT_VALUES = {"train": "train", "training": "train", "test": "test", **dict.fromkeys(VALIDATION_NAMES, "validation")}
IS_VALID_VALUES = {"true": "validation", "1": "validation", "false": "train", "0": "train"}
COLUMNS_FLAG = "--csv-columns"
ROWS_NAMED = 3  # missing files named in an error; the rest are counted


def is_table(source: str) -> bool:
    """True when `source` is a path ending in .csv or .tsv (whether or not it exists)."""
    return Path(source).suffix.lower() in TABLE_EXTENSIONS


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a CSV/TSV file, its delimiter sniffed (tab for .tsv).

    Raises:
        DataError: for a file that is missing, not text, or empty.
    """
    if not path.is_file():
        raise DataError(
            f"Label file {path} does not exist; pass --data a CSV/TSV file of image paths and labels, a folder "
            f"or a tfds name. Received: data={path}"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"Label file {path} is not UTF-8 text; save it as UTF-8 CSV. Received: {error.reason}"
        ) from None
    if not text.strip():
        raise DataError(
            f"Label file {path} is empty; it needs a header (e.g. path,label) and one row per image. "
            f"Received: data={path}"
        )
    if path.suffix.lower() == ".tsv":
        delimiter = "\t"
    else:
        try:
            delimiter = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    rows = [(n, cells) for n, cells in enumerate(csv.reader(text.splitlines(), delimiter=delimiter), 1) if cells]
    header = [cell.strip() for cell in rows[0][1]]
    return header, [(n, cells) for n, cells in rows[1:] if any(cell.strip() for cell in cells)]


def _columns(path: Path, header: list[str], names: Sequence[str]) -> tuple[int, int, int | None]:
    """Indices of the path, label and split (None: no split) columns: those `names` names, else
    the first of the common names of each.

    Raises:
        DataError: naming the header found and the flag that names the columns.
    """
    lowered = [h.lower() for h in header]
    found = ", ".join(header)
    if names:
        if len(names) not in (2, 3):
            raise DataError(
                f"{COLUMNS_FLAG} takes 2 or 3 column names: PATH,LABEL[,SPLIT]. Received: csv_columns={','.join(names)}"
            )
        for role, given in zip(("path", "label", "split"), names, strict=False):
            if given.lower() not in lowered:
                raise DataError(
                    f"{path} has no column {given!r} (the {role} column {COLUMNS_FLAG} names); its header is: "
                    f"{found}. Received: csv_columns={','.join(names)}"
                )
        indices = [lowered.index(given.lower()) for given in names]
        return indices[0], indices[1], indices[2] if len(indices) == 3 else None
    indices = []
    for role, common in (("path", PATH_COLUMNS), ("label", LABEL_COLUMNS)):
        match = next((lowered.index(c) for c in common if c in lowered), None)
        if match is None:
            raise DataError(
                f"{path} has no {role} column (one of {', '.join(common)}); its header is: {found}; name the "
                f"columns with {COLUMNS_FLAG} PATH,LABEL[,SPLIT]. Received: header={found}"
            )
        indices.append(match)
    return indices[0], indices[1], next((lowered.index(c) for c in SPLIT_COLUMNS if c in lowered), None)


def _split_of(value: str, column: str, path: Path, line: int) -> str:
    table = IS_VALID_VALUES if column.lower() == "is_valid" else SPLIT_VALUES
    split = table.get(value.strip().lower())
    if split is None:
        raise DataError(
            f"{path} row {line} has {column}={value!r}, which is no split; use one of {', '.join(table)}. "
            f"Received: {column}={value}"
        )
    return split


def index_table(source: str | os.PathLike, *, columns: Sequence[str] = ()) -> ImageIndex:
    """Lists the images a CSV/TSV file names, by split, without reading them.

    Args:
        source: the .csv or .tsv file.
        columns: the names of the path, label and (optional) split columns; () finds them by name.

    Returns:
        ImageIndex: "train", and "validation" and "test" when the split column has them.

    Raises:
        DataError: naming the file, the row and the fix: a file that is missing or empty, a
            column it lacks (with its header), a row without a path or label, a path that does
            not exist, an unknown split value, fewer than two classes, TIFF files.
    """
    path = Path(source)
    header, rows = _read_rows(path)
    path_col, label_col, split_col = _columns(path, header, columns)
    if not rows:
        raise DataError(f"Label file {path} has a header but no rows. Received: header={', '.join(header)}")
    folder = path.parent
    listed: list[tuple[str, str, str]] = []
    missing: list[str] = []
    for line, cells in rows:
        cells = cells + [""] * (len(header) - len(cells))
        file, label = cells[path_col].strip(), nfc(cells[label_col].strip())
        if not file or not label:
            raise DataError(
                f"{path} row {line} has no {'path' if not file else 'label'} "
                f"(column {header[path_col] if not file else header[label_col]}); fill it in or delete the row. "
                f"Received: row={','.join(cells)}"
            )
        split = _split_of(cells[split_col], header[split_col], path, line) if split_col is not None else "train"
        image = str(folder / file)
        if not os.path.isfile(image):
            missing.append(f"{image} (row {line})")
        listed.append((image, label, split))
    if missing:
        more = f" and {len(missing) - ROWS_NAMED} more" if len(missing) > ROWS_NAMED else ""
        raise DataError(
            f"{len(missing)} image file(s) that {path} names do not exist: {', '.join(missing[:ROWS_NAMED])}{more}; "
            f"paths are relative to the file's folder {folder}. Received: missing={len(missing)}"
        )
    refuse_tiff([p for p, _, _ in listed if Path(p).suffix.lower() in TIFF_EXTENSIONS], folder)
    class_names = sorted({label for _, label, split in listed if split == "train"})
    if len(class_names) < 2:
        raise DataError(f"{path} needs at least two labels among its training rows. Received: classes={class_names}")
    extra = sorted({label for _, label, _ in listed} - set(class_names))
    if extra:
        raise DataError(
            f"{path} has labels in its validation or test rows that no training row has; every class needs "
            f"training images. Received: extra={extra}"
        )
    labels = {name: i for i, name in enumerate(class_names)}
    parts: dict[str, list[tuple[str, int]]] = {}
    for image, label, split in listed:
        parts.setdefault(split, []).append((image, labels[label]))
    if "train" not in parts:
        raise DataError(f"{path} has no training rows. Received: splits={sorted(parts)}")
    column = header[split_col] if split_col is not None else None
    sources = {
        split: str(path) if column is None else f"the {len(items)} rows of {path} whose {column} says {split}"
        for split, items in parts.items()
    }
    log.info(
        "%s: %d images of %d classes (columns %s)",
        path,
        len(listed),
        len(class_names),
        ", ".join(header[c] for c in (path_col, label_col, split_col) if c is not None),
    )
    return ImageIndex(parts=parts, class_names=class_names, sources=sources, root=str(path))
