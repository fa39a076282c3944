"""Loading and saving denoiser weights.

Two formats are read:

* an official MedSyn accelerate folder: ``pytorch_model.bin`` (raw weights) and
  ``pytorch_model_1.bin`` (EMA weights), or ``model.safetensors`` /
  ``model_1.safetensors`` from newer accelerate releases. Keys start with
  ``denoise_fn.``, may carry a leading ``module.`` from multi-GPU training, and
  the shared middle self-attention weights may appear under all four names or,
  in safetensors files, only under ``mid_spatial_attn1``. The folder stores no
  architecture, so it comes from the settings.
* this package's own ``.safetensors`` file, which embeds its :class:`UnetConfig`
  as JSON metadata.

Both load with ``strict=True``: a mismatch lists the first missing, unexpected and
wrongly shaped keys.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from medsyn_xai.model.unet import N_MIDDLE_ROUNDS, Unet3D, UnetConfig

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "file_sha256",
    "load_official_folder",
    "load_safetensors",
    "load_checkpoint",
    "save_safetensors",
    "normalize_official_keys",
    "fill_shared_self_attention",
    "FORMAT_TAG",
]

FORMAT_TAG = "medsyn-xai-unet/1"
OFFICIAL_PREFIX = "denoise_fn."
SHARED_SELF_ATTENTION = ("fn.fn.fn.to_qkv.weight", "fn.fn.fn.to_out.weight")
_REPORTED_KEYS = 5


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the architecture."""


@dataclass(frozen=True)
class LoadedModel:
    """A denoiser with its provenance.

    Attributes:
        model: the network in eval mode on the CPU.
        config: its architecture.
        source: the file the weights came from, or "" for random initialisation.
        sha256: hex SHA-256 of that file, or "" for random initialisation.
        weights: "ema", "raw", "file" (own format) or "random-init".
        native_shape: (F, H, W) the weights were trained at, when the file records it.
        channel_names: names of the output channels, when the file records them.
        metadata: the remaining string metadata of an own ``.safetensors`` file.
    """

    model: Unet3D
    config: UnetConfig
    source: str
    sha256: str
    weights: str
    native_shape: tuple[int, int, int] | None = None
    channel_names: tuple[str, ...] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalize_official_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map official MedSyn keys to :class:`Unet3D` keys.

    Strips a leading ``module.`` and the ``denoise_fn.`` prefix, and copies the
    shared self-attention weights to the names of rounds 2 to 4 when only round 1
    carries them.

    Raises:
        CheckpointError: a key lacks the ``denoise_fn.`` prefix.
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix("module.")
        if not name.startswith(OFFICIAL_PREFIX):
            raise CheckpointError(
                f"checkpoint key '{key}' does not start with '{OFFICIAL_PREFIX}': "
                "this is not a MedSyn GaussianDiffusion state dict"
            )
        renamed[name.removeprefix(OFFICIAL_PREFIX)] = tensor
    return fill_shared_self_attention(renamed)


def fill_shared_self_attention(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy the shared self-attention weights of round 1 to rounds 2-4 where absent."""
    for suffix in SHARED_SELF_ATTENTION:
        first = f"mid_spatial_attn1.{suffix}"
        if first not in state_dict:
            continue
        for round_index in range(2, N_MIDDLE_ROUNDS + 1):
            state_dict.setdefault(f"mid_spatial_attn{round_index}.{suffix}", state_dict[first])
    return state_dict


def _check_and_load(model: Unet3D, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state_dict[key].shape)} != {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(tensor.shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:_REPORTED_KEYS])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:_REPORTED_KEYS])})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} with another shape (first: {'; '.join(wrong_shape[:_REPORTED_KEYS])})")
        raise CheckpointError(
            f"checkpoint '{source}' does not fit the configured architecture: {', '.join(parts)}; "
            "set the model.* settings to the architecture it was trained with"
        )
    model.load_state_dict(state_dict, strict=True)


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"checkpoint file '{path}' could not be read ({reason}): it may be truncated; download or copy it again"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint file '{path}' does not hold a flat state dict of tensors")
    return state


def load_official_folder(folder: Path, config: UnetConfig, *, use_ema: bool = True) -> LoadedModel:
    """Load an official MedSyn accelerate checkpoint folder.

    Args:
        folder: the ``<step>_ckpt`` folder written by ``Accelerator.save_state``.
        config: the architecture the weights were trained with.
        use_ema: read the EMA copy (model 1) rather than the raw weights (model 0).
    """
    index = "_1" if use_ema else ""
    candidates = [folder / f"pytorch_model{index}.bin", folder / f"model{index}.safetensors"]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        names = " or ".join(candidate.name for candidate in candidates)
        raise CheckpointError(
            f"checkpoint folder '{folder}' has no {names}: point model.checkpoint at an accelerate "
            "checkpoint folder, or set model.use_ema to match the files it holds"
        )

    state_dict = normalize_official_keys(_read_tensor_file(path))
    model = Unet3D(config)
    _check_and_load(model, state_dict, path)
    return LoadedModel(
        model=model.eval(),
        config=config,
        source=str(path),
        sha256=file_sha256(path),
        weights="ema" if use_ema else "raw",
    )


def load_safetensors(path: Path) -> LoadedModel:
    """Load a ``.safetensors`` file written by :func:`save_safetensors`."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"checkpoint file '{path}' could not be read ({error}): it may be truncated; copy it again"
        ) from None
    if metadata.get("format") != FORMAT_TAG or "config" not in metadata:
        raise CheckpointError(
            f"checkpoint file '{path}' has no medsyn-xai config metadata: "
            "for an official MedSyn checkpoint point model.checkpoint at its folder instead"
        )
    try:
        config = UnetConfig.from_dict(json.loads(metadata["config"]))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint file '{path}' has an invalid embedded config: {error}") from None

    native_shape = channel_names = None
    try:
        if "native_shape" in metadata:
            native_shape = tuple(int(size) for size in json.loads(metadata["native_shape"]))
        if "channel_names" in metadata:
            channel_names = tuple(str(name) for name in json.loads(metadata["channel_names"]))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint file '{path}' has invalid grid or channel metadata: {error}") from None
    if native_shape is not None and len(native_shape) != 3:
        raise CheckpointError(f"checkpoint file '{path}' records native_shape {native_shape}: expected 3 sizes")
    if channel_names is not None and len(channel_names) != config.channels:
        raise CheckpointError(
            f"checkpoint file '{path}' names {len(channel_names)} channels for a {config.channels}-channel model"
        )

    model = Unet3D(config)
    _check_and_load(model, fill_shared_self_attention(_read_tensor_file(path)), path)
    return LoadedModel(
        model=model.eval(),
        config=config,
        source=str(path),
        sha256=file_sha256(path),
        weights="file",
        native_shape=native_shape,
        channel_names=channel_names,
        metadata={key: value for key, value in metadata.items() if key not in ("format", "config")},
    )


def load_checkpoint(path: str | Path, config: UnetConfig, *, use_ema: bool = True) -> LoadedModel:
    """Load weights from an official folder or an own ``.safetensors`` file.

    Raises:
        CheckpointError: the path is missing, unreadable, or of another architecture.
    """
    path = Path(path)
    if path.is_dir():
        return load_official_folder(path, config, use_ema=use_ema)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"checkpoint '{path}' is a single {path.suffix or 'extensionless'} file: "
                "use a medsyn-xai .safetensors file or an accelerate checkpoint folder"
            )
        return load_safetensors(path)
    raise CheckpointError(f"checkpoint '{path}' not found: fix model.checkpoint or leave it empty for the default model")


def save_safetensors(model: Unet3D, path: str | Path, *, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights and config to ``path`` (temp file, then rename).

    The shared self-attention weights are stored once, under round 1, and
    restored on load.
    """
    path = Path(path)
    state = model.state_dict()
    for suffix in SHARED_SELF_ATTENTION:
        for round_index in range(2, N_MIDDLE_ROUNDS + 1):
            state.pop(f"mid_spatial_attn{round_index}.{suffix}", None)
    tensors = {key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}

    metadata = {"format": FORMAT_TAG, "config": json.dumps(model.config.to_dict())}
    metadata.update(extra_metadata or {})

    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(path)
    return path
