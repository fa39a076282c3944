"""Text-to-CT diffusion with cross-attention saliency and clinical entity heatmaps."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medsyn-xai")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
