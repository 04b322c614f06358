"""kvshare.anchors: see the README module map."""
