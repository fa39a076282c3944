"""Choosing the denoiser from settings: a user checkpoint or the shipped default."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from medsyn_xai.config import ModelSettings
from medsyn_xai.model.checkpoint import LoadedModel, load_checkpoint, load_safetensors
from medsyn_xai.model.unet import Unet3D, UnetConfig

__all__ = ["default_weights_path", "load_model", "unet_config_from_settings", "RANDOM_INIT", "RANDOM_INIT_SEED"]

RANDOM_INIT_SEED = 0
RANDOM_INIT = "none"


def unet_config_from_settings(settings: ModelSettings) -> UnetConfig:
    """Build the architecture described by the ``model`` settings."""
    return UnetConfig(
        dim=settings.dim,
        dim_mults=settings.dim_mults,
        channels=settings.channels,
        heads=settings.heads,
        dim_head=settings.dim_head,
        cond_dim=settings.cond_dim,
        text_tokens=settings.text_tokens,
        init_kernel_size=settings.init_kernel_size,
        resnet_groups=settings.resnet_groups,
        up_path_order=settings.up_path_order,
        attend_to_padding=settings.attend_to_padding,
        slice_position_embedding=settings.slice_position_embedding,
    )


def default_weights_path() -> Path | None:
    """Return the default model's weights shipped in the package, or None if absent."""
    path = Path(str(resources.files("medsyn_xai") / "weights" / "default.safetensors"))
    return path if path.is_file() else None


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load the denoiser the settings select, on the CPU in eval mode.

    An empty ``checkpoint`` loads the shipped default weights. ``"none"`` (or an
    empty ``checkpoint`` in a package without shipped weights) initialises the
    configured architecture from seed ``RANDOM_INIT_SEED`` and labels it
    "random-init": its volumes show the pipeline working, not a trained model.
    """
    shipped = default_weights_path()
    if settings.checkpoint == RANDOM_INIT or (not settings.checkpoint and shipped is None):
        return _random_init(settings)
    if settings.checkpoint:
        return load_checkpoint(settings.checkpoint, unet_config_from_settings(settings), use_ema=settings.use_ema)
    return load_safetensors(shipped)


def _random_init(settings: ModelSettings) -> LoadedModel:
    config = unet_config_from_settings(settings)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(RANDOM_INIT_SEED)
    try:
        model = Unet3D(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return LoadedModel(model=model.eval(), config=config, source="", sha256="", weights="random-init")
