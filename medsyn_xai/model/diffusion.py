"""Continuous-time cosine diffusion with x0 prediction and DDIM sampling.

Notation (t is continuous in [0, 1]; t = 1 is pure noise):

=================  ============================================================
``alpha_bar(t)``   signal fraction cos^2(pi/2 * (t + s) / (1 + s)) with s = 0.008,
                   as in MedSyn's training code (not renormalised, so
                   alpha_bar(0) = 0.99984)
``x_t``            sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * noise
``x0_hat``         the network's prediction of x0, clipped to [-1, 1]
``eps_hat``        the noise implied by x_t and x0_hat
``w``              classifier-free guidance scale: null + w * (cond - null)
=================  ============================================================

The network receives the time as t * 1000, the scale MedSyn's sampler uses.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Protocol

import torch

from medsyn_xai.model.unet import Unet3D

__all__ = [
    "SamplingInterrupted",
    "SamplingObserver",
    "alpha_bar",
    "ddim_timesteps",
    "initial_noise",
    "q_sample",
    "sample",
    "TIME_SCALE",
    "COSINE_OFFSET",
]

TIME_SCALE = 1000.0
COSINE_OFFSET = 0.008


class SamplingInterrupted(RuntimeError):
    """Sampling stopped early because ``should_stop`` returned True."""


class SamplingObserver(Protocol):
    """Receives sampling events; a saliency capture implements it."""

    def begin_step(self, step: int, t: float) -> None:
        """Called before the network runs for step ``step`` (0 = noisiest) at time ``t``."""

    def conditional(self) -> "object":
        """Context manager around the conditional forward pass."""

    def unconditional(self) -> "object":
        """Context manager around the unconditional (null text) forward pass."""


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine signal fraction at continuous time ``t`` in [0, 1]; same shape as ``t``."""
    t = t.to(torch.float64)
    return (torch.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2).clamp(0.0, 1.0)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Noise a clean batch x0 (B, C, F, H, W) to times t (B,) with the given noise."""
    signal = alpha_bar(t).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return signal.sqrt() * x0 + (1 - signal).sqrt() * noise


def ddim_timesteps(steps: int) -> torch.Tensor:
    """Return the ``steps + 1`` times from 1 down to 0, evenly spaced, float64."""
    if steps < 1:
        raise ValueError(f"steps is {steps}: use at least 1 sampling step")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Return the starting noise x_1 for ``seed``: float32 on the CPU, same on every machine."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


class _NullObserver:
    def begin_step(self, step: int, t: float) -> None:
        pass

    def conditional(self) -> nullcontext:
        return nullcontext()

    def unconditional(self) -> nullcontext:
        return nullcontext()


@torch.inference_mode()
def sample(
    model: Unet3D,
    context: torch.Tensor,
    *,
    shape: tuple[int, int, int],
    seed: int,
    context_mask: torch.Tensor | None = None,
    steps: int = 50,
    guidance_scale: float = 1.0,
    observer: SamplingObserver | None = None,
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Generate one volume by deterministic DDIM sampling with x0 prediction.

    Args:
        model: the denoiser, in eval mode, on its device.
        context: text embeddings (1, T, D) on any device.
        context_mask: bool (1, T), False at padding positions, for models that do
            not attend to padding; the null-text branch attends to every position.
        shape: (F, H, W) of the generated volume in voxels.
        seed: seed of the starting noise; the result depends only on the seed,
            settings, weights and device.
        steps: DDIM steps from t = 1 to t = 0.
        guidance_scale: classifier-free guidance scale w; 1.0 runs the
            conditional branch only.
        observer: receives step events and wraps each forward pass.
        progress: called with 1 after every step (for a progress bar).
        should_stop: polled before every step; True raises :class:`SamplingInterrupted`.

    Returns:
        x0 (1, C, F, H, W) float32 in [-1, 1], on the model's device.
    """
    if guidance_scale <= 0 or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale is {guidance_scale}: use a finite value > 0 (1.0 turns guidance off)")

    observer = observer or _NullObserver()
    device = next(model.parameters()).device
    channels = model.config.channels
    context = context.to(device=device, dtype=torch.float32)
    null_context = model.null_cond_emb.expand(context.shape[0], -1, -1)

    x = initial_noise((1, channels, *shape), seed).to(device)
    times = ddim_timesteps(steps)

    for step in range(steps):
        if should_stop is not None and should_stop():
            raise SamplingInterrupted(f"sampling stopped at step {step} of {steps}")

        t, s = times[step], times[step + 1]
        observer.begin_step(step, float(t))
        network_time = torch.full((1,), float(t) * TIME_SCALE, device=device)

        # 1. Predict x0, mixing in the null-text prediction for guidance.
        with observer.conditional():
            x0_hat = model(x, network_time, context, context_mask)
        if guidance_scale != 1.0:
            with observer.unconditional():
                x0_null = model(x, network_time, null_context)
            x0_hat = x0_null + guidance_scale * (x0_hat - x0_null)
        x0_hat = x0_hat.clamp(-1.0, 1.0)

        # 2. DDIM update: keep the implied noise, move the signal to time s. The
        #    last step returns the prediction itself.
        alpha_t, alpha_s = float(alpha_bar(t)), float(alpha_bar(s))
        if step == steps - 1:
            x = x0_hat
        else:
            eps_hat = (x - math.sqrt(alpha_t) * x0_hat) / math.sqrt(max(1.0 - alpha_t, 1e-12))
            x = math.sqrt(alpha_s) * x0_hat + math.sqrt(1.0 - alpha_s) * eps_hat

        if progress is not None:
            progress(1)

    return x
