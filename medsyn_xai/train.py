"""Training loop for the denoiser: x0 loss, classifier-free text dropout, EMA.

One loop serves phantoms and user NIfTI data. Every random draw of the loop (batch
indices, times, noise, text dropout) comes from one ``torch.Generator`` whose state
is saved in each checkpoint, so a resumed run continues exactly where the saved one
stopped.

Outputs under ``train.out_dir``:

* ``checkpoints/step-000250.pt``: model, EMA, optimiser, generator state, step;
* ``latest.pt``: a copy of the newest checkpoint, read by ``--resume``;
* ``model.safetensors``: the EMA weights with their config and native grid,
  loadable as ``model.checkpoint`` (and shipped as the default model).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog
import torch
from torch import nn

from medsyn_xai.config import Settings, TrainSettings
from medsyn_xai.data import NiftiFolderDataset, PhantomDataset, TextEmbeddingCache
from medsyn_xai.grounding import grounding_loss, record_attention, region_on_attention_grid, span_token_mask
from medsyn_xai.model.checkpoint import CheckpointError, load_safetensors, save_safetensors
from medsyn_xai.model.diffusion import TIME_SCALE, q_sample
from medsyn_xai.model.registry import unet_config_from_settings
from medsyn_xai.model.unet import Unet3D, UnetConfig
from medsyn_xai.negation import NegationMasker
from medsyn_xai.phantom import FINDING_KINDS
from medsyn_xai.text.encoder import TextEncoder
from medsyn_xai.text.tokens import TokenRecord

__all__ = ["TrainState", "Trainer", "TrainingError", "shift_time", "weighted_x0_loss"]

log = structlog.get_logger(__name__)


class TrainingError(RuntimeError):
    """Training cannot start or continue with the given settings or files."""


def weighted_x0_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    channel_weights: torch.Tensor,
    lesion_channel: int | None,
    lesion_weight: float,
    include_predicted: bool = False,
) -> torch.Tensor:
    """Mean squared error on x0 with per-channel and lesion-voxel weights.

    Args:
        prediction, target: (B, C, D, H, W) in [-1, 1].
        channel_weights: (C,) weight of each channel.
        lesion_channel: index of the binary lesion channel in ``target``, or None.
        lesion_weight: factor for every channel at voxels where the target lesion
            channel is positive (lesions are often under 1 % of the voxels).
        include_predicted: also weight voxels where the predicted lesion channel
            is positive, so a lesion drawn against the text costs as much as a
            missed one. The weights carry no gradient.

    Returns:
        Scalar loss: the weighted mean over all elements, normalised by the weights.
    """
    weights = channel_weights.view(1, -1, 1, 1, 1).expand_as(target)
    if lesion_channel is not None and lesion_weight != 1.0:
        lesion = target[:, lesion_channel : lesion_channel + 1] > 0
        if include_predicted:
            lesion = lesion | (prediction.detach()[:, lesion_channel : lesion_channel + 1] > 0)
        weights = weights * (1 + (lesion_weight - 1) * lesion.to(target.dtype))
    return ((prediction - target) ** 2 * weights).sum() / weights.sum()


# Modules that start at zero, so a run may add them to weights trained without them.
_ZERO_START_PREFIXES = ("mid_slice_position.",)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Map uniform times t in [0, 1] to s * t / (1 + (s - 1) * t).

    The map keeps 0 and 1 and is increasing. A shift s > 1 moves mass towards
    t = 1 (pure noise): with s = 3 a third of the times lie above 0.85, against 15 %
    for uniform times.
    """
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class TrainState:
    """Everything a checkpoint restores."""

    step: int
    model: Unet3D
    ema: Unet3D
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


class Trainer:
    """Builds the model, data and optimiser from settings and runs the loop.

    Args:
        settings: all settings; ``settings.train`` drives the loop and
            ``settings.model`` / ``settings.text`` the architecture and encoder.
        text_encoder: an already loaded encoder to reuse; None loads one.
        progress: called with 1 per generated phantom case while data is built.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        text_encoder: TextEncoder | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.train = settings.train
        _check_train_settings(self.train, settings)
        if self.train.threads > 0:
            torch.set_num_threads(self.train.threads)

        self.out_dir = Path(self.train.out_dir)
        self.config = unet_config_from_settings(settings.model)
        self.channel_names = tuple(settings.model.channel_names)
        self.native_shape = (settings.model.depth, settings.model.height, settings.model.width)

        self.text_encoder = text_encoder or TextEncoder(
            settings.text.folder or None, max_tokens=settings.text.max_tokens, layer=settings.text.layer
        )
        if self.text_encoder.hidden_size != self.config.cond_dim:
            raise TrainingError(
                f"text encoder width {self.text_encoder.hidden_size} differs from model.cond_dim={self.config.cond_dim}: "
                "set model.cond_dim to the encoder's hidden size"
            )
        if self.text_encoder.max_tokens != self.config.text_tokens:
            raise TrainingError(
                f"text.max_tokens={self.text_encoder.max_tokens} differs from model.text_tokens={self.config.text_tokens}: "
                "set both to the same length"
            )
        hide = settings.text.hide_negated and not self.config.attend_to_padding
        self.negation_masker = NegationMasker() if hide else None
        self._masks: dict[str, torch.Tensor] = {}
        self._hidden: dict[str, tuple[int, ...]] = {}
        description = self.text_encoder.description
        cache_key = {key: description[key] for key in ("config_sha256", "max_tokens", "layer")}
        cache_key["negation_rules_version"] = self.negation_masker.backend.version if self.negation_masker else None
        self.text_cache = TextEmbeddingCache(
            lambda text: self.text_encoder.encode(text, hidden=self._hidden_tokens(text)).embeddings,
            key=json.dumps(cache_key, sort_keys=True),
            encode_batch=lambda texts: self.text_encoder.encode_batch(
                texts, hidden=[self._hidden_tokens(text) for text in texts]
            ),
        )
        self._token_records: dict[str, tuple[TokenRecord, ...]] = {}
        self.last_grounding_loss = torch.zeros(())
        self.dataset = self._build_dataset(progress)

        weights = self.train.channel_weights or (1.0,) * self.config.channels
        self.channel_weights = torch.tensor(weights, dtype=torch.float32)
        self.lesion_channel = self.channel_names.index("lesion") if "lesion" in self.channel_names else None

    def _grounding_targets(
        self, items: list[dict], *, text_kept: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return token masks (N, T), regions (N, F, h*w) and sample indices (N,) of the batch's drawn findings.

        Findings of samples whose text was dropped (``text_kept`` False) are left out.
        """
        factor = self.config.downsample_factor
        token_masks, regions, sample_index = [], [], []
        for index, item in enumerate(items):
            if not text_kept[index]:
                continue
            tokens = self._tokens(item["report"])
            for finding in item.get("findings", []):
                mask = span_token_mask(finding["spans"], tokens)
                if not mask.any():
                    continue  # the mention lies past the text's max_tokens
                token_masks.append(mask)
                regions.append(region_on_attention_grid(finding["region"], factor))
                sample_index.append(index)
        if not token_masks:
            n_tokens, n_slices = self.config.text_tokens, self.native_shape[0]
            n_pixels = (self.native_shape[1] // factor) * (self.native_shape[2] // factor)
            empty = torch.zeros((0, n_tokens), dtype=torch.bool), torch.zeros((0, n_slices, n_pixels), dtype=torch.bool)
            return (*empty, torch.zeros(0, dtype=torch.long))
        return torch.stack(token_masks), torch.stack(regions), torch.tensor(sample_index, dtype=torch.long)

    def _tokens(self, report: str) -> tuple[TokenRecord, ...]:
        """Return the report's token records, tokenised once per report."""
        tokens = self._token_records.get(report)
        if tokens is None:
            tokens = self._token_records[report] = self.text_encoder.tokenize(report)[0]
        return tokens

    def _attention_mask(self, report: str) -> torch.Tensor:
        """Return the report's bool (T,) cross-attention mask, built once per report.

        False at padding and, with :attr:`negation_masker` set, at the tokens of
        negated entities, as at sampling.
        """
        mask = self._masks.get(report)
        if mask is None:
            mask = self.text_encoder.attention_mask(report)
            mask[list(self._hidden_tokens(report))] = False
            self._masks[report] = mask
        return mask

    def _hidden_tokens(self, report: str) -> tuple[int, ...]:
        """Return the token positions of the report's negated entities, or () when none are hidden."""
        if self.negation_masker is None:
            return ()
        hidden = self._hidden.get(report)
        if hidden is None:
            hidden = self._hidden[report] = self.negation_masker.hidden_tokens(report, self._tokens(report))
        return hidden

    def _build_dataset(self, progress):
        if self.train.data == "nifti":
            return NiftiFolderDataset(
                self.train.nifti_folder,
                text_cache=self.text_cache,
                channel_names=self.channel_names,
                native_shape=self.native_shape,
            )
        seeds = range(self.train.seed_offset, self.train.seed_offset + self.train.cases)
        return PhantomDataset(
            seeds,
            text_cache=self.text_cache,
            channel_names=self.channel_names,
            native_shape=self.native_shape,
            phantom_shape=self.train.phantom_shape,
            spec_options={
                "max_findings": self.train.max_findings,
                "kinds": self.train.finding_kinds or None,
                "p_normal": self.train.p_normal,
                "p_negation": self.train.p_negation,
            },
            progress=progress,
        )

    def new_state(self) -> TrainState:
        """Return a fresh state: initialised model, EMA copy, AdamW, seeded generator.

        With ``train.init_weights`` set, the model starts from those weights. With
        ``train.slice_position_std`` > 0, its slice position embedding is drawn anew.
        """
        torch.manual_seed(self.train.seed)
        model = Unet3D(self.config)
        if self.train.init_weights:
            initial = self._initial_weights(Path(self.train.init_weights), model.state_dict())
            model.load_state_dict(initial, strict=True)
        if self.train.slice_position_std > 0:
            generator = torch.Generator().manual_seed(self.train.seed)
            model.mid_slice_position.reset_parameters(self.train.slice_position_std, generator)
        ema = copy.deepcopy(model).requires_grad_(False)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=self.train.learning_rate, weight_decay=self.train.weight_decay
        )
        generator = torch.Generator().manual_seed(self.train.seed)
        return TrainState(step=0, model=model, ema=ema, optimizer=optimizer, generator=generator)

    def _initial_weights(self, path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the weights in ``path`` checked against ``expected``, the new model's state dict."""
        try:
            loaded = load_safetensors(path)
        except CheckpointError as error:
            raise TrainingError(f"train.init_weights: {error}") from None
        # Options that change no weight, such as attend_to_padding, may differ. A
        # slice position embedding missing from the file starts at zero.
        weights = loaded.model.state_dict()
        added = {
            key: value
            for key, value in expected.items()
            if key not in weights and key.startswith(_ZERO_START_PREFIXES)
        }
        merged = {**weights, **added}
        if {key: tuple(value.shape) for key, value in merged.items()} != {
            key: tuple(value.shape) for key, value in expected.items()
        }:
            raise TrainingError(
                f"train.init_weights '{path}' contains a different architecture: set the model.* settings it was trained with"
            )
        if added:
            log.info("initial weights extended", path=str(path), added=sorted(added))
        return merged

    def load_state(self, path: Path) -> TrainState:
        """Restore a state saved by :meth:`save_checkpoint`."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as error:
            raise TrainingError(f"checkpoint '{path}' could not be read ({error}): remove it or resume from another") from None
        saved_config = None
        if isinstance(payload.get("config"), dict):
            try:
                # from_dict fills options added since the checkpoint was written with their defaults.
                saved_config = UnetConfig.from_dict(payload["config"]).to_dict()
            except (TypeError, ValueError):
                saved_config = None
        if saved_config != self.config.to_dict():
            raise TrainingError(
                f"checkpoint '{path}' was trained with another architecture: restore its model.* settings or start fresh"
            )
        state = self.new_state()
        state.model.load_state_dict(payload["model"], strict=True)
        state.ema.load_state_dict(payload["ema"], strict=True)
        state.optimizer.load_state_dict(payload["optimizer"])
        state.generator.set_state(payload["generator"])
        state.step = int(payload["step"])
        return state

    def save_checkpoint(self, state: TrainState) -> Path:
        """Write the checkpoint of ``state`` and refresh ``latest.pt`` and the EMA export."""
        checkpoints = self.out_dir / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        path = checkpoints / f"step-{state.step:06d}.pt"
        payload = {
            "step": state.step,
            "config": self.config.to_dict(),
            "model": state.model.state_dict(),
            "ema": state.ema.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "generator": state.generator.get_state(),
            "train_settings": _jsonable(self.train),
        }
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save(payload, temporary)
        os.replace(temporary, path)

        latest_temporary = self.out_dir / ".latest.pt.tmp"
        shutil.copyfile(path, latest_temporary)
        os.replace(latest_temporary, self.out_dir / "latest.pt")
        self.export(state)
        return path

    def export(self, state: TrainState) -> Path:
        """Write the EMA weights as ``model.safetensors`` with grid and channel metadata."""
        metadata = {
            "native_shape": json.dumps(list(self.native_shape)),
            "channel_names": json.dumps(list(self.channel_names)),
            "text_max_tokens": str(self.text_encoder.max_tokens),
            "text_encoder": json.dumps(self.text_encoder.description),
            "text_hide_negated": json.dumps(self.negation_masker is not None),
            "train_step": str(state.step),
            "train_settings": json.dumps(_jsonable(self.train)),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return save_safetensors(state.ema, self.out_dir / "model.safetensors", extra_metadata=metadata)

    def resume_or_new(self, resume: bool) -> TrainState:
        """Return the state in ``latest.pt`` when ``resume`` is set, else a fresh one."""
        latest = self.out_dir / "latest.pt"
        if resume:
            if not latest.is_file():
                raise TrainingError(f"--resume given but '{latest}' does not exist: run without --resume first")
            state = self.load_state(latest)
            log.info("training resumed", path=str(latest), step=state.step)
            return state
        return self.new_state()

    def training_step(self, state: TrainState) -> float:
        """Run one optimisation step on a random batch; return the loss."""
        train = self.train
        generator = state.generator
        batch_size = train.batch_size

        # 1. Draw a batch, times and noise from the run's generator.
        indices = torch.randint(len(self.dataset), (batch_size,), generator=generator).tolist()
        items = [self.dataset[index] for index in indices]
        x0 = torch.stack([item["image"] for item in items])
        context = torch.stack([item["text"] for item in items])
        context_mask = torch.stack([self._attention_mask(item["report"]) for item in items])
        t = shift_time(torch.rand(batch_size, generator=generator, dtype=torch.float64), train.time_shift)
        noise = torch.randn(x0.shape, generator=generator)
        drop = torch.rand(batch_size, generator=generator) < train.cond_drop_prob

        # 2. Replace dropped texts by the learned null embedding (classifier-free guidance).
        model = state.model.train()
        null = model.null_cond_emb.expand(batch_size, -1, -1)
        context = torch.where(drop.view(-1, 1, 1), null, context)
        context_mask = context_mask | drop.view(-1, 1)  # the null embedding attends everywhere

        # 3. Predict x0 from x_t, keeping the attention when the grounding loss needs it.
        x_t = q_sample(x0, t, noise).to(torch.float32)
        grounding = train.grounding_weight > 0
        with record_attention(model) if grounding else contextlib.nullcontext([]) as attention:
            prediction = model(x_t, (t * TIME_SCALE).to(torch.float32), context, context_mask)
        loss = weighted_x0_loss(
            prediction,
            x0,
            channel_weights=self.channel_weights,
            lesion_channel=self.lesion_channel,
            lesion_weight=train.lesion_weight,
            include_predicted=train.lesion_weight_on == "target_or_prediction",
        )
        if grounding:
            targets = self._grounding_targets(items, text_kept=~drop)
            term = grounding_loss(attention, *targets)
            self.last_grounding_loss = term.detach()
            loss = loss + train.grounding_weight * term

        # 4. Take a clipped AdamW step.
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        state.optimizer.step()
        state.step += 1

        # 5. EMA: copy the weights until ema_start, then average.
        _update_ema(state.ema, model, decay=train.ema_decay if state.step > train.ema_start else 0.0)
        return float(loss.detach())

    def fit(
        self,
        state: TrainState,
        *,
        progress: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainState:
        """Train until ``train.steps``, logging and checkpointing on schedule."""
        train = self.train
        running, running_grounding = [], []
        while state.step < train.steps:
            if should_stop is not None and should_stop():
                log.info("training stopped", step=state.step)
                break
            loss = self.training_step(state)
            if not math.isfinite(loss):
                raise TrainingError(f"loss became {loss} at step {state.step}: lower train.learning_rate")
            running.append(loss)
            running_grounding.append(float(self.last_grounding_loss))
            if progress is not None:
                progress(1)
            if state.step % train.log_every == 0:
                metrics = {"loss": sum(running) / len(running)}
                if train.grounding_weight > 0:
                    metrics["grounding_loss"] = sum(running_grounding) / len(running_grounding)
                log.info("train metrics", step=state.step, **metrics)
                running.clear()
                running_grounding.clear()
            if state.step % train.checkpoint_every == 0:
                path = self.save_checkpoint(state)
                log.info("checkpoint written", step=state.step, path=str(path))
        if state.step % train.checkpoint_every:
            self.save_checkpoint(state)
        else:
            # Resuming a finished run writes no checkpoint, but still exports its weights.
            self.export(state)
        return state


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, *, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param.detach(), 1.0 - decay)


def _jsonable(settings: TrainSettings) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(settings)))


def _check_train_settings(train: TrainSettings, settings: Settings) -> None:
    checks = [
        (train.steps >= 1, f"train.steps is {train.steps}: use 1 or more"),
        (train.batch_size >= 1, f"train.batch_size is {train.batch_size}: use 1 or more"),
        (train.cases >= 1, f"train.cases is {train.cases}: use 1 or more"),
        (train.learning_rate > 0, f"train.learning_rate is {train.learning_rate}: use a positive number"),
        (0 <= train.cond_drop_prob <= 1, f"train.cond_drop_prob is {train.cond_drop_prob}: use a probability in [0, 1]"),
        (0 <= train.ema_decay < 1, f"train.ema_decay is {train.ema_decay}: use a number in [0, 1)"),
        (train.checkpoint_every >= 1, f"train.checkpoint_every is {train.checkpoint_every}: use 1 or more"),
        (train.log_every >= 1, f"train.log_every is {train.log_every}: use 1 or more"),
        (train.lesion_weight > 0, f"train.lesion_weight is {train.lesion_weight}: use a positive number"),
        (train.time_shift > 0, f"train.time_shift is {train.time_shift}: use a positive number (1 keeps times uniform)"),
        (
            train.slice_position_std >= 0,
            f"train.slice_position_std is {train.slice_position_std}: use 0 (start at zero) or a positive number",
        ),
        (
            train.slice_position_std == 0 or settings.model.slice_position_embedding,
            f"train.slice_position_std is {train.slice_position_std} but model.slice_position_embedding is off: "
            "turn it on or set the std to 0",
        ),
        (
            train.grounding_weight >= 0,
            f"train.grounding_weight is {train.grounding_weight}: use 0 (off) or a positive number",
        ),
        (
            train.grounding_weight == 0 or train.data == "phantom",
            f"train.grounding_weight is {train.grounding_weight} but train.data is '{train.data}': "
            "finding regions exist only for phantoms, so set the weight to 0",
        ),
        (0 <= train.p_normal <= 1, f"train.p_normal is {train.p_normal}: use a probability in [0, 1]"),
        (0 <= train.p_negation <= 1, f"train.p_negation is {train.p_negation}: use a probability in [0, 1]"),
        (
            not set(train.finding_kinds) - set(FINDING_KINDS),
            f"train.finding_kinds has {sorted(set(train.finding_kinds) - set(FINDING_KINDS))}: "
            f"use names from {', '.join(FINDING_KINDS)}",
        ),
        (
            not train.init_weights or Path(train.init_weights).is_file(),
            f"train.init_weights '{train.init_weights}' is not a file: point it at a model.safetensors export",
        ),
        (
            not train.channel_weights or len(train.channel_weights) == settings.model.channels,
            f"train.channel_weights has {len(train.channel_weights)} values for {settings.model.channels} channels",
        ),
        (
            train.data != "nifti" or bool(train.nifti_folder),
            "train.data is 'nifti' but train.nifti_folder is empty: set it to the data folder",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)
