"""Saliency capture: normalisation, hook removal, no effect on the volume, memory."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from medsyn_xai.model.diffusion import sample
from medsyn_xai.model.layers import CrossAttentionProcessor
from medsyn_xai.model.unet import Unet3D, UnetConfig
from medsyn_xai.saliency.capture import SaliencyCapture, SaliencyError
from medsyn_xai.saliency.resize import resize_maps

CONFIG = UnetConfig(dim=8, dim_mults=(1, 2), channels=3, heads=2, dim_head=8, cond_dim=16, text_tokens=7)
SHAPE = (4, 8, 8)
GRID = (8 // 2, 8 // 2)


@pytest.fixture(scope="module")
def model() -> Unet3D:
    torch.manual_seed(0)
    return Unet3D(CONFIG).eval()


@pytest.fixture(scope="module")
def context() -> torch.Tensor:
    return torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(2))


def run(model, context, capture, steps=3, guidance_scale=1.0):
    with capture:
        volume = sample(model, context, shape=SHAPE, seed=5, steps=steps, observer=capture, guidance_scale=guidance_scale)
    return volume


def test_maps_sum_to_one_over_tokens(model, context):
    capture = SaliencyCapture(model)
    run(model, context, capture)
    maps = capture.token_maps(*GRID)
    assert maps.shape == (7, 4, *GRID)
    assert maps.dtype == torch.float32
    assert torch.allclose(maps.sum(dim=0), torch.ones(4, *GRID), atol=1e-5)
    assert (maps >= 0).all()
    assert capture.n_included == 3 * 4


def test_capture_does_not_change_volume(model, context):
    plain = sample(model, context, shape=SHAPE, seed=5, steps=3)
    captured = run(model, context, SaliencyCapture(model))
    assert torch.equal(plain, captured)


def test_hooks_removed_after_exception(model, context):
    originals = [layer.processor for layer in model.cross_attention_layers()]
    capture = SaliencyCapture(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture:
            assert all(type(layer.processor) is not CrossAttentionProcessor for layer in model.cross_attention_layers())
            raise RuntimeError("boom")
    assert [layer.processor for layer in model.cross_attention_layers()] == originals
    assert not capture.active


def test_capture_cannot_be_entered_twice(model):
    capture = SaliencyCapture(model)
    with capture:
        with pytest.raises(SaliencyError, match="already active"):
            capture.__enter__()


def test_memory_independent_of_steps(model, context):
    short, long = SaliencyCapture(model), SaliencyCapture(model)
    run(model, context, short, steps=2)
    run(model, context, long, steps=8)
    assert short._sum.shape == long._sum.shape
    assert short._sum.numel() == 7 * 4 * GRID[0] * GRID[1]
    assert long.n_included == 8 * 4


def test_layer_and_step_selection(model, context):
    capture = SaliencyCapture(model, layers=[3], steps=[2])
    run(model, context, capture, steps=3)
    assert capture.n_included == 1

    reference = {}

    class Keep(CrossAttentionProcessor):
        def observe(self, attention, probabilities):
            reference.setdefault("calls", []).append(probabilities.mean(dim=2)[0].clone())

    layers = model.cross_attention_layers()
    saved = [layer.processor for layer in layers]
    for layer in layers:
        layer.processor = Keep()
    try:
        sample(model, context, shape=SHAPE, seed=5, steps=3)
    finally:
        for layer, processor in zip(layers, saved):
            layer.processor = processor
    # Calls arrive step by step, four layers per step: step 2, layer 3 is the last.
    expected = reference["calls"][-1].permute(2, 0, 1).reshape(7, 4, *GRID)
    assert torch.allclose(capture.token_maps(*GRID), expected)


def test_unconditional_branch_not_recorded(model, context):
    capture = SaliencyCapture(model)
    run(model, context, capture, steps=3, guidance_scale=3.0)
    assert capture.n_included == 3 * 4
    assert torch.allclose(capture.token_maps(*GRID).sum(0), torch.ones(4, *GRID), atol=1e-5)


def test_invalid_selection_rejected(model):
    with pytest.raises(SaliencyError, match="layer 4 does not exist"):
        SaliencyCapture(model, layers=[4])
    with pytest.raises(SaliencyError, match="negative"):
        SaliencyCapture(model, steps=[-1])


def test_nothing_recorded_is_an_error(model, context):
    capture = SaliencyCapture(model, steps=[50])
    run(model, context, capture, steps=2)
    with pytest.raises(SaliencyError, match="no attention was recorded"):
        capture.token_maps(*GRID)


def test_resize_maps_keeps_constant_and_shape():
    maps = torch.rand(3, 4, 2, 2)
    resized = resize_maps(maps, (8, 6, 6))
    assert resized.shape == (3, 8, 6, 6)
    constant = resize_maps(torch.full((1, 4, 2, 2), 0.25), (8, 8, 8))
    assert torch.allclose(constant, torch.full_like(constant, 0.25))
    assert resize_maps(torch.zeros(0, 4, 2, 2), (8, 8, 8)).shape == (0, 8, 8, 8)


@pytest.mark.parametrize(
    ("shape", "grid"),
    [((64, 8, 8), (64, 64, 64)), ((16, 8, 8), (64, 64, 64)), ((5, 7, 3), (11, 4, 9)), ((4, 4, 4), (4, 4, 4))],
)
def test_resize_maps_matches_interpolate(shape, grid):
    maps = torch.rand(3, *shape, generator=torch.Generator().manual_seed(4))
    expected = F.interpolate(maps[:, None], size=grid, mode="trilinear", align_corners=False)[:, 0]
    resized = resize_maps(maps, grid)
    assert resized.shape == (3, *grid)
    assert torch.allclose(resized, expected, atol=1e-6)


def test_nested_captures_see_same_run(model, context):
    from medsyn_xai.saliency.capture import ObserverGroup

    full = SaliencyCapture(model)
    last = SaliencyCapture(model, layers=[3], steps=[2])
    with full, last:
        sample(model, context, shape=SHAPE, seed=5, steps=3, observer=ObserverGroup(full, last))

    alone = SaliencyCapture(model, layers=[3], steps=[2])
    run(model, context, alone, steps=3)
    single = SaliencyCapture(model)
    run(model, context, single, steps=3)

    assert torch.allclose(last.token_maps(*GRID), alone.token_maps(*GRID))
    assert torch.allclose(full.token_maps(*GRID), single.token_maps(*GRID))
    assert all(type(layer.processor) is CrossAttentionProcessor for layer in model.cross_attention_layers())


def test_masked_padding_gets_no_attention(model, context):
    masked = Unet3D(replace(CONFIG, attend_to_padding=False)).eval()
    masked.load_state_dict(model.state_dict())
    mask = torch.tensor([[True, True, True, True, False, False, False]])
    capture = SaliencyCapture(masked)
    with capture:
        sample(masked, context, context_mask=mask, shape=SHAPE, seed=5, steps=3, observer=capture)
    maps = capture.token_maps(*GRID)

    assert torch.all(maps[4:] == 0)
    assert torch.allclose(maps[:4].sum(dim=0), torch.ones(4, *GRID), atol=1e-5)


def test_masked_padding_content_ignored(model, context):
    masked = Unet3D(replace(CONFIG, attend_to_padding=False)).eval()
    masked.load_state_dict(model.state_dict())
    mask = torch.tensor([[True, True, True, True, False, False, False]])
    other_padding = context.clone()
    other_padding[:, 4:] = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(9))

    def volume(network, text, text_mask):
        return sample(network, text, context_mask=text_mask, shape=SHAPE, seed=5, steps=2)

    assert torch.equal(volume(masked, context, mask), volume(masked, other_padding, mask))
    assert not torch.equal(volume(model, context, mask), volume(model, other_padding, mask))
