"""Cross-attention saliency: per-token maps captured during one sampling run.

While a :class:`SaliencyCapture` is active, each middle cross-attention layer of the
denoiser runs a recording processor. For every conditional forward pass of an
included (layer, step) pair it adds the attention probabilities, averaged over
heads, into one running sum per token position:

    sum[j, f, y, x] += mean over heads of p(token j | pixel (y, x) of slice f)

The stored map is ``sum / count`` where ``count`` is the number of included
(layer, step) pairs, so at every voxel the maps of all T token positions (special
and padding included) sum to 1. Memory is T x F x h x w float32 on the model's
device, whatever the number of steps. The unconditional (null text) branch of
classifier-free guidance is never recorded.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
from einops import rearrange

from medsyn_xai.model.layers import CrossAttention, CrossAttentionProcessor
from medsyn_xai.model.unet import Unet3D

__all__ = ["ObserverGroup", "SaliencyCapture", "SaliencyError"]


class SaliencyError(RuntimeError):
    """The capture was used in a way that cannot produce token maps."""


class _RecordingProcessor(CrossAttentionProcessor):
    """Processor that forwards the probabilities of one layer to its capture.

    It also passes them on to the processor it replaced, so captures with
    different layer and step selections can be nested around one sampling run.
    """

    def __init__(self, capture: "SaliencyCapture", layer: int, previous: CrossAttentionProcessor) -> None:
        self.capture = capture
        self.layer = layer
        self.previous = previous

    def observe(self, attention: CrossAttention, probabilities: torch.Tensor) -> None:
        self.capture._record(self.layer, probabilities)
        self.previous.observe(attention, probabilities)


class SaliencyCapture:
    """Context manager that records token maps from a :class:`Unet3D` during sampling.

    Args:
        model: the denoiser whose cross-attention layers are hooked.
        layers: 0-based indices of the middle cross-attention layers to include;
            None or empty includes all.
        steps: 0-based sampling step indices to include (0 is the noisiest step);
            None or empty includes all.

    Pass the capture as ``observer`` to :func:`medsyn_xai.model.diffusion.sample`
    inside the ``with`` block, then read :meth:`token_maps`. Entering installs a
    recording processor on each layer; leaving restores the previous processors,
    also when the block raises. A capture cannot be entered twice at once, but
    several captures can be nested and driven together through an
    :class:`ObserverGroup`.

    Example::

        with SaliencyCapture(model) as capture:
            x0 = sample(model, context, shape=(32, 32, 32), seed=0, observer=capture)
        maps = capture.token_maps()  # (T, F, h, w) float32, sums to 1 over T
    """

    def __init__(
        self,
        model: Unet3D,
        *,
        layers: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
    ) -> None:
        self.model = model
        self._layers_hooked = model.cross_attention_layers()
        n_layers = len(self._layers_hooked)

        self.layers = tuple(sorted(set(layers))) if layers else tuple(range(n_layers))
        invalid = [layer for layer in self.layers if not 0 <= layer < n_layers]
        if invalid:
            raise SaliencyError(
                f"saliency layer {invalid[0]} does not exist: use indices 0 to {n_layers - 1}"
            )
        self.steps = frozenset(steps) if steps else None
        if self.steps is not None and any(step < 0 for step in self.steps):
            raise SaliencyError(f"saliency steps {sorted(self.steps)} contain a negative index: use 0 or more")

        self._saved_processors: list[CrossAttentionProcessor] | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._step_included = True
        self._recording = False
        self.steps_seen = 0

    def __enter__(self) -> "SaliencyCapture":
        if self._saved_processors is not None:
            raise SaliencyError("this SaliencyCapture is already active: create a new one per sampling run")
        self._saved_processors = [layer.processor for layer in self._layers_hooked]
        for index, layer in enumerate(self._layers_hooked):
            layer.processor = _RecordingProcessor(self, index, layer.processor)
        self._sum = None
        self._count = 0
        self.steps_seen = 0
        return self

    def __exit__(self, *exc_info) -> bool:
        for layer, processor in zip(self._layers_hooked, self._saved_processors or []):
            layer.processor = processor
        self._saved_processors = None
        self._recording = False
        return False

    @property
    def active(self) -> bool:
        """True between ``__enter__`` and ``__exit__``."""
        return self._saved_processors is not None

    def begin_step(self, step: int, t: float) -> None:
        """Mark the start of sampling step ``step`` (0 is the noisiest)."""
        self._step_included = self.steps is None or step in self.steps
        self.steps_seen = max(self.steps_seen, step + 1)

    @contextmanager
    def conditional(self) -> Iterator[None]:
        """Record the probabilities of the forward pass run inside this block."""
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    @contextmanager
    def unconditional(self) -> Iterator[None]:
        """Run a forward pass without recording it (the null-text branch)."""
        previous, self._recording = self._recording, False
        try:
            yield
        finally:
            self._recording = previous

    def _record(self, layer: int, probabilities: torch.Tensor) -> None:
        if not (self._recording and self._step_included and layer in self.layers):
            return
        if probabilities.shape[0] != 1:
            raise SaliencyError(
                f"saliency capture expects batch 1, got {probabilities.shape[0]}: sample one prompt at a time"
            )

        # (1, F, heads, h*w, T) -> (T, F, h*w), averaged over heads.
        per_token = rearrange(probabilities[0].mean(dim=1), "f n t -> t f n").to(torch.float32)
        if self._sum is None:
            self._sum = torch.zeros_like(per_token)
        self._sum += per_token
        self._count += 1

    @property
    def n_included(self) -> int:
        """Number of (layer, step) pairs added so far."""
        return self._count

    def token_maps(self, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Return the mean token maps (T, F, h, w) float32 on the CPU.

        Args:
            height, width: in-plane size h, w of the cross-attention grid; None
                infers a square grid.

        Raises:
            SaliencyError: nothing was recorded, because sampling did not run inside
                the capture or the layer and step selection matched no call.
        """
        if self._sum is None or self._count == 0:
            raise SaliencyError(
                "no attention was recorded: run sampling inside the capture with observer=capture, "
                "and check saliency.layers and saliency.steps against the model and step count"
            )
        n_pixels = self._sum.shape[-1]
        if height is None or width is None:
            side = int(round(n_pixels**0.5))
            if side * side != n_pixels:
                raise SaliencyError(f"cannot infer the grid of {n_pixels} pixels: pass height and width")
            height = width = side
        mean = self._sum / self._count
        return rearrange(mean, "t f (y x) -> t f y x", y=height, x=width).cpu()


class ObserverGroup:
    """Several sampling observers (for example nested captures) acting as one.

    Pass it as ``observer`` to :func:`medsyn_xai.model.diffusion.sample`; each
    event reaches every member in order.
    """

    def __init__(self, *observers) -> None:
        self.observers = observers

    def begin_step(self, step: int, t: float) -> None:
        for observer in self.observers:
            observer.begin_step(step, t)

    @contextmanager
    def conditional(self) -> Iterator[None]:
        with ExitStack() as stack:
            for observer in self.observers:
                stack.enter_context(observer.conditional())
            yield

    @contextmanager
    def unconditional(self) -> Iterator[None]:
        with ExitStack() as stack:
            for observer in self.observers:
                stack.enter_context(observer.unconditional())
            yield
