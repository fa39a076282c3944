"""Token grounding loss: hand-made attention with known values, gradients, and a training run that lowers it."""

from __future__ import annotations

import pytest
import torch

from medsyn_xai.data import phantom_case
from medsyn_xai.grounding import grounding_loss, record_attention, region_on_attention_grid, span_token_mask
from medsyn_xai.model.layers import CrossAttentionProcessor
from medsyn_xai.model.unet import Unet3D
from medsyn_xai.train import Trainer, TrainingError
from test_train import settings_for

SLICES, PIXELS, TOKENS = 2, 4, 6


def _attention(token_map: torch.Tensor) -> torch.Tensor:
    """Build (1, F, heads=2, h*w, T) probabilities where token 1 gets ``token_map`` (F, h*w) and token 0 the rest."""
    probabilities = torch.zeros(1, SLICES, 2, PIXELS, TOKENS)
    probabilities[0, :, :, :, 1] = token_map[:, None, :]
    probabilities[0, :, :, :, 0] = 1 - token_map[:, None, :]
    return probabilities


def _targets(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    token_mask = torch.zeros(1, TOKENS, dtype=torch.bool)
    token_mask[0, 1] = True
    return token_mask, region[None], torch.zeros(1, dtype=torch.long)


REGION = torch.tensor([[True, True, False, False], [False, False, False, False]])


@pytest.mark.parametrize(
    ("token_map", "expected"),
    [
        (REGION.float() * 0.9, 0.0),  # attends only inside the region
        ((~REGION).float() * 0.5, 1.0),  # only outside
        (torch.full((SLICES, PIXELS), 0.3), 0.75),  # flat: the region is 2 of 8 pixels
    ],
)
def test_loss_on_known_maps(token_map, expected):
    loss = grounding_loss([_attention(token_map)], *_targets(REGION))

    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_loss_averages_layers():
    inside, outside = _attention(REGION.float()), _attention((~REGION).float())

    assert float(grounding_loss([inside, outside], *_targets(REGION))) == pytest.approx(0.5)


def test_no_findings_gives_zero():
    empty = torch.zeros(0, TOKENS, dtype=torch.bool), torch.zeros(0, SLICES, PIXELS, dtype=torch.bool)
    loss = grounding_loss([_attention(REGION.float())], *empty, torch.zeros(0, dtype=torch.long))

    assert float(loss) == 0.0
    assert not loss.requires_grad


def test_mismatched_rows_rejected():
    token_mask, region, _ = _targets(REGION)

    with pytest.raises(ValueError, match="pass one row per finding"):
        grounding_loss([_attention(REGION.float())], token_mask, region, torch.zeros(2, dtype=torch.long))


def test_region_pooled_in_plane():
    region = torch.zeros(3, 8, 8, dtype=torch.bool)
    region[1, 3, 5] = True

    pooled = region_on_attention_grid(region, 2)

    assert pooled.shape == (3, 16)
    assert pooled.sum() == 1
    assert pooled[1, 1 * 4 + 2]  # row 3 // 2 = 1, column 5 // 2 = 2 of a 4 x 4 grid


def test_span_mask_selects_word_pieces(text_encoder):
    report = "Spiculated nodule in the RUL. No pleural effusion."
    tokens = text_encoder.tokenize(report)[0]
    start = report.index("nodule")

    mask = span_token_mask([(start, start + len("nodule"))], tokens)

    assert [tokens[index].text for index in torch.nonzero(mask).flatten().tolist()] == ["nod", "##ule"]
    assert not any(mask[token.index] for token in tokens if token.special)


def test_record_attention_keeps_graph_and_restores(tiny_settings):
    from medsyn_xai.model.registry import unet_config_from_settings

    model = Unet3D(unet_config_from_settings(tiny_settings.model))
    layers = model.cross_attention_layers()
    before = [layer.processor for layer in layers]
    x = torch.randn(1, model.config.channels, 8, 16, 16)
    context = torch.randn(1, model.config.text_tokens, model.config.cond_dim)

    with record_attention(model) as recorded:
        model(x, torch.tensor([500.0]), context)
    sum(probabilities[..., 0].sum() for probabilities in recorded).backward()

    assert len(recorded) == len(layers)
    assert recorded[0].shape[-1] == model.config.text_tokens
    assert layers[0].to_q.weight.grad is not None
    assert [layer.processor for layer in layers] == before
    assert all(type(processor) is CrossAttentionProcessor for processor in before)


CHANNELS = ("ct", "lobes", "airway", "vessels", "lesion")


def _case(seed: int, *, max_findings: int = 1, p_normal: float = 0.0) -> dict:
    options = {"max_findings": max_findings, "p_normal": p_normal, "p_negation": 0.0}
    return phantom_case(seed, channel_names=CHANNELS, native_shape=(8, 8, 8), phantom_shape=(16, 16, 16),
                        spec_options=options)


def test_phantom_case_lists_drawn_findings():
    case = _case(7)
    lesion = case["image"][CHANNELS.index("lesion")] > 0

    assert len(case["findings"]) == 1
    finding = case["findings"][0]
    assert finding["region"].shape == (8, 8, 8)
    assert finding["region"].any()
    assert (finding["region"] == lesion).all()  # one finding, so its region is the lesion channel
    assert all(case["report"][start:end].strip() for start, end in finding["spans"])


def test_phantom_case_skips_negated_findings():
    case = _case(1, max_findings=3, p_normal=1.0)  # a normal report that negates three findings

    assert [finding["assertion"] for finding in case["spec"]["findings"]] == ["absent"] * 3
    assert case["findings"] == []


def test_training_lowers_grounding_loss(tmp_path, text_encoder):
    settings = settings_for(
        tmp_path, cond_drop_prob=0.0, grounding_weight=5.0, cases=4, steps=40, max_findings=1, p_normal=0.0,
        p_negation=0.0, learning_rate=3e-3,
    )
    trainer = Trainer(settings, text_encoder=text_encoder)
    state = trainer.new_state()
    losses = []
    for _ in range(40):
        trainer.training_step(state)
        losses.append(float(trainer.last_grounding_loss))

    assert losses[0] > 0
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"grounding_weight": -0.1}, "grounding_weight is -0.1"),
        ({"grounding_weight": 0.1, "data": "nifti", "nifti_folder": "x"}, "finding regions exist only for phantoms"),
    ],
)
def test_invalid_grounding_settings(tmp_path, text_encoder, override, fragment):
    with pytest.raises(TrainingError, match=fragment):
        Trainer(settings_for(tmp_path, **override), text_encoder=text_encoder)
