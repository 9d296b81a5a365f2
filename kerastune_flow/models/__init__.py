"""The models: heads and compiling, the from-scratch builders, the pre-trained backbones, and the
transfer helpers (build on a frozen base, cut a user's model, unfreeze from a block).

    heads.py      HeadSpec, optimizers (discriminative rates), compile_model, count_params
    scratch.py    build_scratch_mlp, build_cifar10_cnn
    backbones.py  the keras.applications backbones, their preprocessing and blocks
    hub.py        KerasHub presets (hub:NAME or a folder) as bases: HubFamily, hub_base, pretrained_base
    transfer.py   TransferSpec, transfer_model, build_transfer_model, cut_base, find_base, unfreeze_from, ...
    saving.py     load_keras_model (safe mode unless asked)
"""

import warnings

from kerastune_flow.models.backbones import (
    BACKBONES,
    VGG16_NOTOP_FILE,
    VGG16_UNFREEZE_AT,
    Backbone,
    ImagenetPreprocessing,
    backbone_base,
    get_backbone,
    is_preprocessing,
    preprocessing_layer,
)
from kerastune_flow.models.heads import (
    HeadSpec,
    compile_model,
    count_params,
    logits_head,
    make_optimizer,
    transfer_head,
)
from kerastune_flow.models.hub import (
    HUB_FAMILIES,
    HubFamily,
    base_record,
    hub_base,
    is_hub,
    pretrained_base,
)
from kerastune_flow.models.saving import UNSAFE_FLAG, load_keras_model
from kerastune_flow.models.scratch import CNN_MIN_SIZE, build_cifar10_cnn, build_scratch_mlp
from kerastune_flow.models.transfer import (
    CUSTOM_BASE_NAME,
    TransferSpec,
    block_starts,
    build_transfer_model,
    build_vgg16_feature_extractor,
    build_vgg16_finetune,
    cut_base,
    default_unfreeze_at,
    describe_layer,
    find_base,
    resolve_unfreeze_at,
    transfer_model,
    unfreeze_from,
)

__all__ = [
    "BACKBONES",
    "CNN_MIN_SIZE",
    "CUSTOM_BASE_NAME",
    "HUB_FAMILIES",
    "UNSAFE_FLAG",
    "VGG16_NOTOP_FILE",
    "VGG16_UNFREEZE_AT",
    "Backbone",
    "HeadSpec",
    "HubFamily",
    "ImagenetPreprocessing",
    "backbone_base",
    "base_record",
    "block_starts",
    "build_cifar10_cnn",
    "build_scratch_mlp",
    "build_transfer_model",
    "build_vgg16_feature_extractor",
    "build_vgg16_finetune",
    "compile_model",
    "count_params",
    "cut_base",
    "default_unfreeze_at",
    "describe_layer",
    "find_base",
    "get_backbone",
    "hub_base",
    "is_hub",
    "is_preprocessing",
    "load_keras_model",
    "logits_head",
    "make_optimizer",
    "preprocessing_layer",
    "pretrained_base",
    "resolve_unfreeze_at",
    "TransferSpec",
    "transfer_head",
    "transfer_model",
    "unfreeze_from",
]


def __getattr__(name: str):
    # `Head` was HeadSpec's name: kept one release for callers of the former spelling.
    if name == "Head":
        warnings.warn("`Head` is now `HeadSpec`; the old name goes in the next release.", DeprecationWarning, 2)
        return HeadSpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
