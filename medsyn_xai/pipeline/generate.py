"""The sampling job: one prompt in, one study store with CT, masks and token maps out."""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import structlog
import torch

from medsyn_xai import __version__
from medsyn_xai.config import Settings
from medsyn_xai.model.checkpoint import LoadedModel
from medsyn_xai.model.diffusion import COSINE_OFFSET, TIME_SCALE, sample
from medsyn_xai.model.registry import load_model
from medsyn_xai.model.volume import decode_volume
from medsyn_xai.negation import NegationMasker
from medsyn_xai.saliency.capture import SaliencyCapture
from medsyn_xai.store import (
    SampledStudy,
    StoreError,
    StudyExistsError,
    marker_path,
    study_path,
    validate_study_id,
    write_study,
)
from medsyn_xai.text.encoder import EncodedPrompt, TextEncoder

if TYPE_CHECKING:
    from medsyn_xai.ner.backends import NERBackend

__all__ = [
    "GenerationRequest",
    "StudyGenerator",
    "check_request",
    "new_study_id",
    "preflight",
    "MAX_STEPS",
    "MAX_GUIDANCE_SCALE",
]

log = structlog.get_logger(__name__)

MAX_STEPS = 1000
MAX_GUIDANCE_SCALE = 50.0


def new_study_id() -> str:
    """Return a fresh study id such as ``study-20261204T213000Z-3f9a1c``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"study-{stamp}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to generate; None fields fall back to the sampler settings."""

    prompt: str
    study_id: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None


def check_request(request: GenerationRequest) -> None:
    """Reject a request before any model runs; messages name the value and the fix."""
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise ValueError("prompt is empty: give the report text to generate from")
    if request.study_id is not None:
        validate_study_id(request.study_id)
    if request.seed is not None and (isinstance(request.seed, bool) or not isinstance(request.seed, int) or request.seed < 0):
        raise ValueError(f"seed is {request.seed!r}: use an integer >= 0")
    if request.steps is not None and (
        isinstance(request.steps, bool) or not isinstance(request.steps, int) or not 1 <= request.steps <= MAX_STEPS
    ):
        raise ValueError(f"steps is {request.steps!r}: use an integer from 1 to {MAX_STEPS}")
    if request.guidance_scale is not None:
        scale = request.guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"guidance scale is {scale!r}: use a number from 1.0 (off) to {MAX_GUIDANCE_SCALE}")
        if not 0 < scale <= MAX_GUIDANCE_SCALE:
            raise ValueError(f"guidance scale is {scale!r}: use a number > 0 and <= {MAX_GUIDANCE_SCALE} (1.0 is off)")


def preflight(root: Path, study_id: str | None, *, overwrite: bool = False) -> None:
    """Check before sampling that the study can be written under ``root``.

    Raises:
        InvalidStudyIdError: the id is invalid.
        StudyExistsError: the study or one of its markers exists and ``overwrite`` is False.
        StoreError: ``root`` cannot be created or written.
    """
    root = Path(root)
    if study_id is not None:
        validate_study_id(study_id)
        existing = [study_path(root, study_id)] + [
            marker_path(root, study_id, kind) for kind in ("sampled", "explained", "failed")
        ]
        if not overwrite and any(path.exists() for path in existing):
            raise StudyExistsError(f"study '{study_id}' already exists in '{root}': pass --overwrite to replace it")

    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise StoreError(f"output folder '{root}' is not writable: choose another --out or fix its permissions")


def resolve_device(name: str) -> torch.device:
    """Return the torch device for a setting; "auto" picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"sampler.device is {name!r}: use auto, cpu, cuda or cuda:N") from None


class StudyGenerator:
    """Holds the denoiser and text encoder of one process and generates studies.

    Build it once per process (the CLI or a daemon) and call :meth:`generate` per
    prompt; the models load in the constructor, never at import time. With an
    ``ner_backend``, every study also stores that backend's entities of the prompt
    in the group attribute ``ner`` ({backend, version, entities}), so the explain
    job can reuse them instead of running NER again.

    With ``text.hide_negated`` set and a model that takes a cross-attention mask
    (``attend_to_padding`` False), the tokens of negated entities are hidden from
    the text encoder and the denoiser (see :mod:`medsyn_xai.negation`). Models
    that attend to every position, such as MedSyn's official network, get the
    prompt as it is.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        loaded: LoadedModel | None = None,
        text_encoder: TextEncoder | None = None,
        ner_backend: NERBackend | None = None,
    ) -> None:
        self.settings = settings
        self.ner_backend = ner_backend
        self.device = resolve_device(settings.sampler.device)
        self.loaded = loaded or load_model(settings.model)
        self.model = self.loaded.model.to(self.device).eval()
        self.text_encoder = text_encoder or TextEncoder(
            settings.text.folder or None,
            max_tokens=settings.text.max_tokens,
            layer=settings.text.layer,
            device=self.device,
        )

        config = self.loaded.config
        if self.text_encoder.hidden_size != config.cond_dim:
            raise ValueError(
                f"text encoder '{self.text_encoder.folder}' gives {self.text_encoder.hidden_size}-wide embeddings "
                f"but the model expects cond_dim={config.cond_dim}: use a matching text.folder or checkpoint"
            )
        if self.text_encoder.max_tokens != config.text_tokens:
            raise ValueError(
                f"text.max_tokens is {self.text_encoder.max_tokens} but the model was built for "
                f"{config.text_tokens} tokens: set text.max_tokens = {config.text_tokens}"
            )
        channel_names = self.channel_names
        if len(channel_names) != config.channels:
            raise ValueError(
                f"model.channel_names lists {len(channel_names)} channels but the model has {config.channels}: "
                "name every output channel, CT first"
            )
        if settings.text.hide_negated and config.attend_to_padding:
            log.warning(
                "negated entities stay visible: the model attends to every text position "
                "(model.attend_to_padding is true), so text.hide_negated is ignored",
                model=settings.model.name,
            )
        hide = settings.text.hide_negated and not config.attend_to_padding
        rules = ner_backend if ner_backend is not None and ner_backend.name == "rules" else None
        self.negation_masker = NegationMasker(rules) if hide else None

    def encode_prompt(self, prompt: str) -> EncodedPrompt:
        """Encode ``prompt``; with :attr:`negation_masker` set, the tokens of its negated entities are hidden."""
        if self.negation_masker is None:
            return self.text_encoder.encode(prompt)
        return self.negation_masker.encode(self.text_encoder, prompt)

    @property
    def model_description(self) -> dict[str, object]:
        """Provenance of the denoiser for store attributes."""
        weights = self.loaded.weights
        name = self.settings.model.name
        if weights == "random-init":
            name = f"{name} (random-init, untrained)"
        return {
            "name": name,
            "weights": weights,
            "checkpoint": self.loaded.source,
            "checkpoint_sha256": self.loaded.sha256,
            "config": self.loaded.config.to_dict(),
            "channel_names": list(self.channel_names),
            "native_shape": list(self.native_shape),
        }

    @property
    def native_shape(self) -> tuple[int, int, int]:
        """(F, H, W) the denoiser generates before resizing to the output grid.

        A checkpoint that records its training grid sets it; otherwise
        ``model.depth``, ``model.height`` and ``model.width`` do.
        """
        if self.loaded.native_shape is not None:
            return self.loaded.native_shape
        model = self.settings.model
        return (model.depth, model.height, model.width)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Output channel names, CT first, from the checkpoint or ``model.channel_names``."""
        return self.loaded.channel_names or self.settings.model.channel_names

    def generate(
        self,
        request: GenerationRequest,
        root: Path,
        *,
        overwrite: bool = False,
        progress: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        extra_attrs: dict | None = None,
    ) -> Path:
        """Generate one study into ``root/studies/<id>.zarr`` and write its marker.

        Returns:
            The path of the written ``.zarr`` store.
        """
        check_request(request)
        sampler = self.settings.sampler
        study_id = request.study_id or new_study_id()
        seed = sampler.seed if request.seed is None else request.seed
        steps = sampler.steps if request.steps is None else request.steps
        guidance_scale = sampler.guidance_scale if request.guidance_scale is None else float(request.guidance_scale)
        check_request(GenerationRequest(prompt=request.prompt, steps=steps, guidance_scale=guidance_scale, seed=seed))
        bound = log.bind(study_id=study_id)

        encoded = self.encode_prompt(request.prompt)
        ner_attrs = self._ner_attrs(request.prompt)  # before sampling, so an NER failure costs no sampling time
        saliency = self.settings.saliency
        hidden_tokens = _hidden_tokens(encoded)
        bound.info(
            "sampling started",
            steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            device=str(self.device),
            hidden_tokens=len(hidden_tokens),
        )

        capture = SaliencyCapture(self.model, layers=saliency.layers, steps=saliency.steps)
        with capture:
            x0 = sample(
                self.model,
                encoded.embeddings,
                context_mask=encoded.attention_mask,
                shape=self.native_shape,
                seed=seed,
                steps=steps,
                guidance_scale=guidance_scale,
                observer=capture,
                progress=progress,
                should_stop=should_stop,
            )
        factor = self.loaded.config.downsample_factor
        token_maps = capture.token_maps(self.native_shape[1] // factor, self.native_shape[2] // factor)

        output = self.settings.output
        ct, masks = decode_volume(x0, self.channel_names, output.grid)
        attrs = {
            "seed": seed,
            "sampler": {
                "method": "ddim",
                "steps": steps,
                "guidance_scale": guidance_scale,
                "schedule": "cosine",
                "cosine_offset": COSINE_OFFSET,
                "prediction": "x0",
                "time_scale": TIME_SCALE,
                "device": str(self.device),
            },
            "saliency": {
                "method": "cross_attention_mean",
                "layers": list(capture.layers),
                "steps": sorted(capture.steps) if capture.steps is not None else "all",
                "pairs_averaged": capture.n_included,
                "branch": "conditional",
            },
            "model": self.model_description,
            "text_encoder": self.text_encoder.description,
            "truncated": encoded.truncated,
            "prompt_tokens": encoded.n_prompt_tokens,
            "hide_negated": self.negation_masker is not None,
            "hidden_tokens": hidden_tokens,
            "software_version": __version__,
            **ner_attrs,
            **(extra_attrs or {}),
        }
        study = SampledStudy(
            study_id=study_id,
            prompt=request.prompt,
            ct=ct,
            masks=masks,
            tokens=[record.to_dict() for record in encoded.tokens],
            saliency=token_maps.numpy(),
            spacing_mm=output.spacing_mm,
            attrs=attrs,
        )
        path = write_study(root, study, overwrite=overwrite)
        bound.info("study written", path=str(path), truncated=encoded.truncated)
        return path

    def _ner_attrs(self, prompt: str) -> dict[str, object]:
        """Return {"ner": {backend, version, entities}} for the prompt, or {} without a backend."""
        if self.ner_backend is None:
            return {}
        entities = [entity.to_dict() for entity in self.ner_backend.extract(prompt)]
        return {"ner": {"backend": self.ner_backend.name, "version": self.ner_backend.version, "entities": entities}}


def _hidden_tokens(encoded: EncodedPrompt) -> list[int]:
    """Return the prompt positions (not padding) that the attention mask hides, ascending."""
    n_positions = min(encoded.n_prompt_tokens, encoded.attention_mask.shape[-1])
    return [index for index in range(n_positions) if not bool(encoded.attention_mask[0, index])]
