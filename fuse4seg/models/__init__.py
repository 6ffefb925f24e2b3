"""The networks of §3.3-3.4: the fusion leader Φ and the segmentation follower Ψ.

``create_fusion(name)`` / ``create_segmentation(name, in_channels)`` build registered variants
(``*_paper``, ``*_small``, ``*_tiny``); chapters 2 and 3 explain them.
"""

from fuse4seg.models.fusion import INN, FusionLeader, minmax_normalize
from fuse4seg.models.registry import (
    build_leader,
    check_model_names,
    count_parameters,
    create_fusion,
    create_segmentation,
    list_fusion_models,
    list_segmentation_models,
    place_leader,
)
from fuse4seg.models.segmentation import ConvNeXtUNet

__all__ = [
    "INN",
    "ConvNeXtUNet",
    "FusionLeader",
    "build_leader",
    "check_model_names",
    "count_parameters",
    "create_fusion",
    "create_segmentation",
    "list_fusion_models",
    "list_segmentation_models",
    "minmax_normalize",
    "place_leader",
]
