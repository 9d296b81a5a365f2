"""Frozen configuration for data, model and training, and the presets.

    parsing.py   setting values from text: `150x150`, `flip,crop`, `1e-3` or `auto`
    settings.py  the settings: DataConfig, ModelConfig, TrainConfig and Config, each field defined
                 once with its flag's name, help and choices (`setting`)
    values.py    settings given as values: from Python or text (`coerce_settings`, as their flags
                 take them), from a config.json (`load_config_file`), checked whole (`validate`)
    presets.py   named presets: `smoke` (tiny, offline, seconds) and `reference`

The command line's flags are generated from the same fields (`cli/flags.py`): flag names are the
field names with dashes, and a boolean that defaults to True gets a `--no-` flag. Field names are
unique across the three sections, so `make_config(recipe, **overrides)` (in `recipes.py`, which
adds each recipe's defaults) can route each override. Settings as text live here, not beside the
command line, because Python's `make_config` takes a setting as its flag's text too.
"""

from kerastune_flow.config.parsing import (
    AUTO,
    NO_CACHE,
    is_rate,
    parse_cache,
    parse_fractions,
    parse_image_size,
    parse_names,
    parse_rate,
    parse_weights,
)
from kerastune_flow.config.presets import PRESETS
from kerastune_flow.config.settings import (
    AUGMENTATIONS,
    BACKBONE_NAMES,
    CACHE_POLICIES,
    FEATURE_CACHE,
    INITIALIZER_NAMES,
    JIT_COMPILE,
    LR_SCHEDULES,
    MIXED_PRECISION,
    OPTIMIZER_NAMES,
    POOLINGS,
    SECTIONS,
    STRATEGY_NAMES,
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    field_help,
    field_section,
    fields,
    flag_name,
    new_seed,
    setting,
)
from kerastune_flow.config.values import (
    coerce_setting,
    coerce_settings,
    from_values,
    load_config_file,
    text_parser,
    validate,
)

__all__ = [
    "AUGMENTATIONS",
    "AUTO",
    "BACKBONE_NAMES",
    "CACHE_POLICIES",
    "FEATURE_CACHE",
    "INITIALIZER_NAMES",
    "JIT_COMPILE",
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "NO_CACHE",
    "OPTIMIZER_NAMES",
    "POOLINGS",
    "PRESETS",
    "SECTIONS",
    "STRATEGY_NAMES",
    "Config",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "coerce_setting",
    "coerce_settings",
    "field_help",
    "field_section",
    "fields",
    "flag_name",
    "from_values",
    "is_rate",
    "load_config_file",
    "new_seed",
    "parse_cache",
    "parse_fractions",
    "parse_image_size",
    "parse_names",
    "parse_rate",
    "parse_weights",
    "setting",
    "text_parser",
    "validate",
]
