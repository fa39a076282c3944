"""Cross-attention saliency: capture during sampling and resizing to the CT grid."""

from medsyn_xai.saliency.capture import SaliencyCapture, SaliencyError
from medsyn_xai.saliency.resize import resize_maps

__all__ = ["SaliencyCapture", "SaliencyError", "resize_maps"]
