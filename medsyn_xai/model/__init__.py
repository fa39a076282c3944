"""The MedSyn stage-1 denoiser, its diffusion sampler and checkpoint loading."""

from medsyn_xai.model.checkpoint import CheckpointError, LoadedModel, load_checkpoint, save_safetensors
from medsyn_xai.model.diffusion import SamplingInterrupted, sample
from medsyn_xai.model.unet import OFFICIAL_MEDSYN_CONFIG, Unet3D, UnetConfig

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "OFFICIAL_MEDSYN_CONFIG",
    "SamplingInterrupted",
    "Unet3D",
    "UnetConfig",
    "load_checkpoint",
    "sample",
    "save_safetensors",
]
