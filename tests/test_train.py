"""Training loop: the loss falls on a fixed batch and a resumed run matches."""

from dataclasses import replace

import pytest
import torch

from medsyn_xai.config import ModelSettings, Settings, TextSettings, TrainSettings
from medsyn_xai.model.checkpoint import load_safetensors
from medsyn_xai.model.diffusion import TIME_SCALE, q_sample
from medsyn_xai.train import Trainer, TrainingError, shift_time, weighted_x0_loss

TOKENS = 24


def settings_for(out_dir, **overrides) -> Settings:
    train = {
        "out_dir": str(out_dir), "cases": 4, "batch_size": 4, "steps": 4, "checkpoint_every": 2,
        "log_every": 1, "phantom_shape": (16, 16, 16), "learning_rate": 1e-3, **overrides,
    }
    return Settings(
        text=TextSettings(max_tokens=TOKENS),
        model=ModelSettings(dim=8, dim_mults=(1, 2), heads=2, dim_head=8, text_tokens=TOKENS, depth=8, height=8, width=8),
        train=TrainSettings(**train),
    )


def test_weighted_loss_counts_lesion_voxels_more():
    target = -torch.ones(1, 2, 2, 2, 2)
    target[0, 1, 0, 0, 0] = 1.0  # one lesion voxel
    prediction = target.clone()
    prediction[0, 0, 0, 0, 0] += 1.0  # error at the lesion voxel
    weights = torch.ones(2)
    plain = weighted_x0_loss(prediction, target, channel_weights=weights, lesion_channel=1, lesion_weight=1.0)
    weighted = weighted_x0_loss(prediction, target, channel_weights=weights, lesion_channel=1, lesion_weight=5.0)
    assert plain == pytest.approx(1 / 16)
    assert weighted == pytest.approx(5 / (16 + 2 * 4))


def test_weighted_loss_counts_predicted_lesions():
    target = -torch.ones(1, 2, 2, 2, 2)  # no lesion anywhere
    prediction = target.clone()
    prediction[0, 1, 0, 0, 0] = 1.0  # a lesion drawn where there is none: error 2 at one voxel
    weights = torch.ones(2)
    target_only = weighted_x0_loss(prediction, target, channel_weights=weights, lesion_channel=1, lesion_weight=5.0)
    both = weighted_x0_loss(
        prediction, target, channel_weights=weights, lesion_channel=1, lesion_weight=5.0, include_predicted=True
    )
    assert target_only == pytest.approx(4 / 16)
    assert both == pytest.approx(5 * 4 / (16 + 2 * 4))


def test_shift_time_moves_mass_to_noise():
    uniform = torch.rand(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shifted = shift_time(uniform, 3.0)
    assert torch.equal(shift_time(uniform, 1.0), uniform)
    assert shift_time(torch.tensor([0.0, 1.0], dtype=torch.float64), 3.0).tolist() == [0.0, 1.0]
    assert torch.all(torch.diff(shift_time(torch.linspace(0, 1, 101, dtype=torch.float64), 3.0)) > 0)
    assert float((uniform > 0.85).double().mean()) == pytest.approx(0.15, abs=0.01)
    assert float((shifted > 0.85).double().mean()) == pytest.approx(0.346, abs=0.01)


def test_loss_falls_on_fixed_batch(tmp_path, text_encoder):
    trainer = Trainer(settings_for(tmp_path, cond_drop_prob=0.0), text_encoder=text_encoder)
    state = trainer.new_state()
    items = [trainer.dataset[i] for i in range(4)]
    x0 = torch.stack([item["image"] for item in items])
    context = torch.stack([item["text"] for item in items])
    generator = torch.Generator().manual_seed(1)
    t = torch.rand(4, generator=generator, dtype=torch.float64) * 0.5
    x_t = q_sample(x0, t, torch.randn(x0.shape, generator=generator)).float()

    def fixed_loss() -> float:
        with torch.no_grad():
            prediction = state.model.eval()(x_t, (t * TIME_SCALE).float(), context)
        return float(weighted_x0_loss(prediction, x0, channel_weights=trainer.channel_weights,
                                      lesion_channel=trainer.lesion_channel, lesion_weight=1.0))

    before = fixed_loss()
    for _ in range(15):
        trainer.training_step(state)
    assert fixed_loss() < 0.8 * before


def test_resume_reaches_same_state(tmp_path, text_encoder):
    straight = Trainer(settings_for(tmp_path / "straight"), text_encoder=text_encoder)
    final = straight.fit(straight.new_state())

    first = Trainer(settings_for(tmp_path / "split"), text_encoder=text_encoder)
    first.train = replace(first.train, steps=2)
    first.fit(first.new_state())
    second = Trainer(settings_for(tmp_path / "split"), text_encoder=text_encoder)
    resumed = second.fit(second.resume_or_new(resume=True))

    assert resumed.step == final.step == 4
    for key, tensor in final.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], tensor), key
    for key, tensor in final.ema.state_dict().items():
        assert torch.equal(resumed.ema.state_dict()[key], tensor), key
    assert (tmp_path / "split" / "checkpoints" / "step-000002.pt").is_file()
    assert (tmp_path / "split" / "checkpoints" / "step-000004.pt").is_file()


def test_export_loads_as_checkpoint(tmp_path, text_encoder):
    trainer = Trainer(settings_for(tmp_path), text_encoder=text_encoder)
    trainer.fit(trainer.new_state())
    loaded = load_safetensors(tmp_path / "model.safetensors")
    assert loaded.native_shape == (8, 8, 8)
    assert loaded.channel_names == ("ct", "lobes", "airway", "vessels", "lesion")
    assert loaded.metadata["train_step"] == "4"


def test_init_weights_load_export(tmp_path, text_encoder):
    first = Trainer(settings_for(tmp_path / "first"), text_encoder=text_encoder)
    first.fit(first.new_state())
    export = load_safetensors(tmp_path / "first" / "model.safetensors").model.state_dict()

    second = Trainer(
        settings_for(tmp_path / "second", init_weights=str(tmp_path / "first" / "model.safetensors")),
        text_encoder=text_encoder,
    )
    state = second.new_state()
    assert state.step == 0
    for key, tensor in export.items():
        assert torch.equal(state.model.state_dict()[key], tensor), key
        assert torch.equal(state.ema.state_dict()[key], tensor), key


def test_init_weights_architecture_mismatch(tmp_path, text_encoder):
    first = Trainer(settings_for(tmp_path / "first"), text_encoder=text_encoder)
    first.fit(first.new_state())
    wider = settings_for(tmp_path / "second", init_weights=str(tmp_path / "first" / "model.safetensors"))
    wider = replace(wider, model=replace(wider.model, dim=16))
    with pytest.raises(TrainingError, match="contains a different architecture"):
        Trainer(wider, text_encoder=text_encoder).new_state()


def test_init_weights_ignore_padding_option(tmp_path, text_encoder):
    first = Trainer(settings_for(tmp_path / "first"), text_encoder=text_encoder)
    first.fit(first.new_state())
    masked = settings_for(tmp_path / "second", init_weights=str(tmp_path / "first" / "model.safetensors"), steps=2)
    masked = replace(masked, model=replace(masked.model, attend_to_padding=False))

    second = Trainer(masked, text_encoder=text_encoder)
    state = second.fit(second.new_state())
    assert state.step == 2
    assert load_safetensors(tmp_path / "second" / "model.safetensors").config.attend_to_padding is False


def test_init_weights_add_slice_embedding(tmp_path, text_encoder):
    first = Trainer(settings_for(tmp_path / "first"), text_encoder=text_encoder)
    first.fit(first.new_state())
    export = load_safetensors(tmp_path / "first" / "model.safetensors").model.state_dict()
    extended = settings_for(tmp_path / "second", init_weights=str(tmp_path / "first" / "model.safetensors"))
    extended = replace(extended, model=replace(extended.model, slice_position_embedding=True))

    state = Trainer(extended, text_encoder=text_encoder).new_state()
    weights = state.model.state_dict()
    assert torch.count_nonzero(weights["mid_slice_position.proj.weight"]) == 0
    for key, tensor in export.items():
        assert torch.equal(weights[key], tensor), key


def test_slice_std_redraws_loaded_embedding(tmp_path, text_encoder):
    with_slices = settings_for(tmp_path / "first")
    with_slices = replace(with_slices, model=replace(with_slices.model, slice_position_embedding=True))
    first = Trainer(with_slices, text_encoder=text_encoder)
    first.fit(first.new_state())
    export = load_safetensors(tmp_path / "first" / "model.safetensors").model.state_dict()

    redrawn = replace(
        with_slices,
        train=replace(
            with_slices.train,
            out_dir=str(tmp_path / "second"),
            init_weights=str(tmp_path / "first" / "model.safetensors"),
            slice_position_std=0.5,
        ),
    )
    weights = Trainer(redrawn, text_encoder=text_encoder).new_state().model.state_dict()
    again = Trainer(redrawn, text_encoder=text_encoder).new_state().model.state_dict()

    embedding = weights["mid_slice_position.proj.weight"]
    assert not torch.equal(embedding, export["mid_slice_position.proj.weight"])
    assert float(embedding.std()) == pytest.approx(0.5, rel=0.3)
    assert torch.equal(embedding, again["mid_slice_position.proj.weight"])  # seeded by train.seed
    assert torch.count_nonzero(weights["mid_slice_position.proj.bias"]) == 0
    for key, tensor in export.items():
        if not key.startswith("mid_slice_position."):
            assert torch.equal(weights[key], tensor), key


def test_slice_std_needs_the_embedding(tmp_path, text_encoder):
    with pytest.raises(TrainingError, match="slice_position_std is 0.5 but model.slice_position_embedding is off"):
        Trainer(settings_for(tmp_path, slice_position_std=0.5), text_encoder=text_encoder)


def test_finding_kinds_restrict_cases(tmp_path, text_encoder):
    trainer = Trainer(
        settings_for(tmp_path, cases=12, finding_kinds=("nodule",), max_findings=1, p_normal=0.0),
        text_encoder=text_encoder,
    )
    kinds = {finding["kind"] for item in trainer.dataset.data for finding in item["spec"]["findings"]}
    assert kinds == {"nodule"}


def test_resume_of_finished_run_exports(tmp_path, text_encoder):
    trainer = Trainer(settings_for(tmp_path), text_encoder=text_encoder)
    trainer.fit(trainer.new_state())
    (tmp_path / "model.safetensors").unlink()

    again = Trainer(settings_for(tmp_path), text_encoder=text_encoder)
    state = again.fit(again.resume_or_new(resume=True))
    assert state.step == 4
    assert load_safetensors(tmp_path / "model.safetensors").metadata["train_step"] == "4"


def test_resume_checkpoint_without_new_options(tmp_path, text_encoder):
    trainer = Trainer(settings_for(tmp_path), text_encoder=text_encoder)
    trainer.fit(trainer.new_state())
    latest = tmp_path / "latest.pt"
    payload = torch.load(latest, weights_only=False)
    for key in ("attend_to_padding", "slice_position_embedding"):
        del payload["config"][key]
    torch.save(payload, latest)

    state = Trainer(settings_for(tmp_path), text_encoder=text_encoder).resume_or_new(resume=True)
    assert state.step == 4


def test_resume_without_checkpoint_rejected(tmp_path, text_encoder):
    trainer = Trainer(settings_for(tmp_path), text_encoder=text_encoder)
    with pytest.raises(TrainingError, match="latest.pt' does not exist"):
        trainer.resume_or_new(resume=True)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"steps": 0}, "train.steps is 0"),
        ({"cond_drop_prob": 1.5}, "cond_drop_prob is 1.5"),
        ({"channel_weights": (1.0, 2.0)}, "has 2 values for 5 channels"),
        ({"data": "nifti"}, "nifti_folder is empty"),
        ({"p_normal": -0.1}, "p_normal is -0.1"),
        ({"time_shift": 0.0}, "time_shift is 0.0"),
        ({"slice_position_std": -1.0}, "slice_position_std is -1.0"),
        ({"finding_kinds": ("nodule", "tumour")}, "finding_kinds has \\['tumour'\\]"),
        ({"init_weights": "missing/model.safetensors"}, "init_weights 'missing/model.safetensors' is not a file"),
    ],
)
def test_invalid_train_settings(tmp_path, text_encoder, override, fragment):
    with pytest.raises(TrainingError, match=fragment):
        Trainer(settings_for(tmp_path, **override), text_encoder=text_encoder)
