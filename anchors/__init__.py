"""kvshare.anchors: the online pool of position-free KV deviations (anchors).

Wing: ``anchors``. May import: the core and ``kvshare.kernels``.
"""

# Imported by a bare name from the repo root: yield to the installed package (_unshadow.py).
if __name__ != "kvshare.anchors":
    import runpy

    _here = __path__[0]
    runpy.run_path(f"{_here}/../kvshare/_unshadow.py")["hand_over"](__name__, _here)
else:
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
