"""timm backbones: creation with pretrained weights from the hub, local files or offline sources; layer groups.

Example:
    >>> from cvft.backbones import create_backbone, layer_groups
    >>> model = create_backbone("test_vit", num_classes=3)
    >>> layer_groups(model)[-1].name
    'head'
"""

from cvft.backbones.factory import (
    BackboneOptionError,
    UnknownBackboneError,
    create_backbone,
    is_pretrained,
    weights_source,
)
from cvft.backbones.layer_groups import LayerGroup, find_layer_groups, head_parameter_names, layer_groups
from cvft.backbones.sources import (
    WeightsSource,
    cache_dir,
    get_weights_source,
    list_weights_sources,
    register_weights_source,
)
from cvft.backbones.weights import Checkpoint, load_state_dict_file, read_checkpoint, strip_key_prefix

__all__ = [
    "create_backbone",
    "weights_source",
    "is_pretrained",
    "UnknownBackboneError",
    "BackboneOptionError",
    "LayerGroup",
    "layer_groups",
    "find_layer_groups",
    "head_parameter_names",
    "WeightsSource",
    "register_weights_source",
    "get_weights_source",
    "list_weights_sources",
    "cache_dir",
    "Checkpoint",
    "read_checkpoint",
    "load_state_dict_file",
    "strip_key_prefix",
]
