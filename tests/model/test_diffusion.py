"""Cosine schedule, DDIM sampling, guidance, decoding to HU and the slice position embedding."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from medsyn_xai.model.diffusion import (
    SamplingInterrupted,
    alpha_bar,
    ddim_timesteps,
    initial_noise,
    q_sample,
    sample,
)
from medsyn_xai.model.layers import SlicePositionEmbedding
from medsyn_xai.model.unet import Unet3D, UnetConfig
from medsyn_xai.model.volume import HU_MAX, HU_MIN, decode_volume, encode_volume

CONFIG = UnetConfig(dim=8, dim_mults=(1, 2), channels=3, heads=2, dim_head=8, cond_dim=16, text_tokens=5)
SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def model() -> Unet3D:
    torch.manual_seed(0)
    return Unet3D(CONFIG).eval()


@pytest.fixture(scope="module")
def context() -> torch.Tensor:
    return torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))


def test_alpha_bar_endpoints_and_monotone():
    t = torch.linspace(0, 1, 101)
    values = alpha_bar(t)
    assert values[0] == pytest.approx(1.0, abs=2e-4)
    assert values[-1] < 1e-4
    assert torch.all(values[1:] <= values[:-1])


def test_ddim_timesteps():
    times = ddim_timesteps(4)
    assert times.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="steps is 0"):
        ddim_timesteps(0)


def test_q_sample_interpolates():
    x0 = torch.ones(2, 1, 2, 2, 2)
    noise = torch.zeros_like(x0)
    out = q_sample(x0, torch.tensor([0.0, 1.0]), noise)
    assert torch.allclose(out[0], x0[0], atol=1e-3)
    assert out[1].abs().max() < 1e-2


def test_initial_noise_depends_on_seed_only():
    torch.manual_seed(123)
    first = initial_noise((1, 3, *SHAPE), 7)
    torch.manual_seed(456)
    second = initial_noise((1, 3, *SHAPE), 7)
    assert torch.equal(first, second)
    assert not torch.equal(first, initial_noise((1, 3, *SHAPE), 8))


def test_same_seed_bit_identical(model, context):
    first = sample(model, context, shape=SHAPE, seed=3, steps=4)
    second = sample(model, context, shape=SHAPE, seed=3, steps=4)
    other = sample(model, context, shape=SHAPE, seed=4, steps=4)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert first.shape == (1, 3, *SHAPE)
    assert first.abs().max() <= 1.0


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(args[2].data_ptr()))
    return calls, handle


def test_guidance_one_runs_conditional_only(model, context):
    calls, handle = count_forwards(model)
    try:
        sample(model, context, shape=SHAPE, seed=0, steps=3, guidance_scale=1.0)
        assert len(calls) == 3
        calls.clear()
        sample(model, context, shape=SHAPE, seed=0, steps=3, guidance_scale=3.0)
        assert len(calls) == 6
    finally:
        handle.remove()


def test_guidance_changes_the_volume(model, context):
    plain = sample(model, context, shape=SHAPE, seed=0, steps=3, guidance_scale=1.0)
    guided = sample(model, context, shape=SHAPE, seed=0, steps=3, guidance_scale=4.0)
    assert not torch.equal(plain, guided)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_guidance_scale(model, context, scale):
    with pytest.raises(ValueError, match="guidance_scale"):
        sample(model, context, shape=SHAPE, seed=0, steps=1, guidance_scale=scale)


def test_should_stop_interrupts(model, context):
    polls = []

    def stop_after_two():
        polls.append(1)
        return len(polls) > 2

    with pytest.raises(SamplingInterrupted, match="step 2 of 5"):
        sample(model, context, shape=SHAPE, seed=0, steps=5, should_stop=stop_after_two)


def test_progress_called_per_step(model, context):
    ticks = []
    sample(model, context, shape=SHAPE, seed=0, steps=4, progress=ticks.append)
    assert ticks == [1, 1, 1, 1]


def test_decode_volume_ranges_and_grid():
    x0 = torch.linspace(-1, 1, 3 * 4 * 8 * 8).reshape(1, 3, 4, 8, 8)
    ct, masks = decode_volume(x0, ("ct", "lobes", "lesion"), (8, 16, 16))
    assert ct.dtype == np.int16
    assert ct.shape == (8, 16, 16)
    assert ct.min() >= HU_MIN
    assert ct.max() <= HU_MAX
    assert masks["lesion"].dtype == np.uint8
    assert set(np.unique(masks["lesion"])) <= {0, 1}
    assert set(np.unique(masks["lobes"])) <= set(range(6))


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1024, 600, size=(4, 8, 8)).astype(np.float32)
    lobes = rng.integers(0, 6, size=(4, 8, 8)).astype(np.uint8)
    lesion = rng.integers(0, 2, size=(4, 8, 8)).astype(np.uint8)
    names = ("ct", "lobes", "lesion")
    channels = encode_volume(ct, {"lobes": lobes, "lesion": lesion}, names)
    assert channels.shape == (3, 4, 8, 8)
    assert channels.min() >= -1
    assert channels.max() <= 1

    decoded_ct, decoded = decode_volume(torch.from_numpy(channels)[None], names, (4, 8, 8))
    assert np.abs(decoded_ct.astype(np.float32) - ct).max() <= 1.0
    assert np.array_equal(decoded["lobes"], lobes)
    assert np.array_equal(decoded["lesion"], lesion)


def test_decode_rejects_channel_count():
    with pytest.raises(ValueError, match="3 output channels but 2 channel names"):
        decode_volume(torch.zeros(1, 3, 2, 2, 2), ("ct", "lesion"), (2, 2, 2))


def test_slice_position_embedding_starts_neutral(model, context):
    with_slices = Unet3D(replace(CONFIG, slice_position_embedding=True)).eval()
    missing = with_slices.load_state_dict(model.state_dict(), strict=False).missing_keys
    x = torch.randn(1, 3, *SHAPE, generator=torch.Generator().manual_seed(3))
    time = torch.tensor([500.0])

    assert sorted(missing) == ["mid_slice_position.proj.bias", "mid_slice_position.proj.weight"]
    with torch.no_grad():
        assert torch.equal(with_slices(x, time, context), model(x, time, context))


def test_slice_position_embedding_varies_by_slice():
    embedding = SlicePositionEmbedding(4)
    torch.nn.init.normal_(embedding.proj.weight, generator=torch.Generator().manual_seed(0))
    features = torch.zeros(1, 4, 6, 2, 2)
    offsets = embedding(features)[0, :, :, 0, 0]  # (C, F)

    assert offsets.shape == (4, 6)
    assert torch.equal(embedding(features)[0, :, :, 1, 1], offsets)
    for first in range(6):
        for second in range(first + 1, 6):
            assert not torch.allclose(offsets[:, first], offsets[:, second])


def test_slice_embedding_reset_is_seeded():
    embedding = SlicePositionEmbedding(8)
    embedding.reset_parameters(0.5, torch.Generator().manual_seed(3))
    first = embedding.proj.weight.clone()
    embedding.reset_parameters(0.5, torch.Generator().manual_seed(3))
    assert torch.equal(embedding.proj.weight, first)
    assert torch.count_nonzero(first) == first.numel()

    embedding.reset_parameters()
    assert torch.count_nonzero(embedding.proj.weight) == 0
