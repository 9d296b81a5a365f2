"""The sample data that ships inside the package: `--data digits` from any folder.

The samples live in `kerastune_flow/sample_data/` as package data (see its README.md), so the
name works from the installed wheel as well as from the clone. A path that exists wins: a folder
of the user's called `digits` in the working directory is read, not the sample.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# The sample data sets by name: each is an image folder under sample_data/ (one folder per class).
SAMPLES = ("digits",)
SAMPLE_DATA = "sample_data"


def sample_folder(name: str) -> Path:
    """The packaged folder of the sample `name` (one of SAMPLES), wherever the package is installed."""
    return Path(__file__).resolve().parent.parent / SAMPLE_DATA / name


def resolve_sample(source: str) -> str:
    """The path `source` stands for: itself, or the packaged sample it names.

    A source that exists as typed (a file or folder) is returned unchanged, as is one that names
    no sample (a tfds name, or a path the loaders then report as missing). A sample name, alone or
    followed by a path inside it (`digits`, `digits/7`, `digits/7/0000.png`), gives that path in
    the packaged sample.

    Args:
        source: what the user typed for `--data` or an image argument.

    Returns:
        A path or name to load.
    """
    if not source or os.path.exists(source):
        return source
    name, _, rest = source.replace("\\", "/").partition("/")
    if name not in SAMPLES:
        return source
    resolved = sample_folder(name) / rest if rest else sample_folder(name)
    logger.debug("%s: the %s sample shipped in the package, %s", source, name, resolved)
    return str(resolved)
