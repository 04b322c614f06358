"""kvshare.anchors: the online pool of position-free KV deviations (anchors)."""

from kvshare.anchors.features import at_positions, position_free, token_features
from kvshare.anchors.persist import ModelIdentity
from kvshare.anchors.pool import AnchorConfig, AnchorPool, Estimate

__all__ = [
    "AnchorConfig",
    "AnchorPool",
    "Estimate",
    "ModelIdentity",
    "at_positions",
    "position_free",
    "token_features",
]
