"""Unet3D against MedSyn's official state-dict manifest, and checkpoint loading."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medsyn_xai.model.checkpoint import (
    CheckpointError,
    OFFICIAL_PREFIX,
    load_checkpoint,
    load_safetensors,
    save_safetensors,
)
from medsyn_xai.model.unet import OFFICIAL_MEDSYN_CONFIG, Unet3D, UnetConfig

# Every state-dict key and shape of MedSyn's official stage-1 denoiser, read from
# batmanlab/MedSyn on the meta device; names and shapes only, no weights.
MANIFEST = Path(__file__).resolve().parents[1] / "data" / "medsyn_stage1_state_dict.json"
TINY = UnetConfig(dim=8, dim_mults=(1, 2), channels=4, heads=2, dim_head=8, cond_dim=16, text_tokens=6)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def official_state_dict(model: Unet3D) -> dict[str, torch.Tensor]:
    return {OFFICIAL_PREFIX + key: tensor.clone() for key, tensor in model.state_dict().items()}


def test_official_config_matches_manifest(manifest):
    with torch.device("meta"):
        model = Unet3D(OFFICIAL_MEDSYN_CONFIG)
    ours = {OFFICIAL_PREFIX + key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    reference = manifest["tensors"]

    assert sorted(set(reference) - set(ours)) == []
    assert sorted(set(ours) - set(reference)) == []
    mismatched = {key: (ours[key], shape) for key, shape in reference.items() if ours[key] != shape}
    assert mismatched == {}
    assert list(model.buffers()) == []
    assert sum(p.numel() for p in model.parameters()) == manifest["parameter_count"]


def test_official_shared_self_attention_is_one_module(manifest):
    with torch.device("meta"):
        model = Unet3D(OFFICIAL_MEDSYN_CONFIG)
    for group in manifest["shared_keys"]:
        names = [key.removeprefix(OFFICIAL_PREFIX) for key in group]
        tensors = [model.get_parameter(name) for name in names]
        assert all(tensor is tensors[0] for tensor in tensors)


def test_official_attention_probability_shape(manifest):
    """The cross-attention probabilities have the manifest's layout at batch 1."""
    config = UnetConfig(dim=8, dim_mults=(1, 2, 4, 8), channels=4, heads=8, dim_head=4, cond_dim=16, text_tokens=12)
    model = Unet3D(config).eval()
    seen = []

    class Spy(type(model.cross_attention_layers()[0].processor)):
        def observe(self, attention, probabilities):
            seen.append(tuple(probabilities.shape))

    for layer in model.cross_attention_layers():
        layer.processor = Spy()
    with torch.inference_mode():
        model(torch.zeros(1, 4, 4, 64, 64), torch.tensor([10.0]), torch.zeros(1, 12, 16))

    # The manifest folds batch and slices: (B*64, heads, 8*8 pixels, tokens).
    _, heads, pixels, _ = manifest["cross_attention"]["attention_probability_shape"]
    assert seen == [(1, 4, heads, pixels, 12)] * 4


def write_accelerate_folder(folder: Path, raw: Unet3D, ema: Unet3D, *, module_prefix=False, safetensors=False):
    folder.mkdir(parents=True)
    for index, model in (("", raw), ("_1", ema)):
        state = official_state_dict(model)
        if module_prefix:
            state = {"module." + key: tensor for key, tensor in state.items()}
        if safetensors:
            # accelerate keeps one name per shared storage: round 1 only.
            state = {key: tensor for key, tensor in state.items() if not any(
                f"mid_spatial_attn{n}.fn.fn.fn" in key for n in (2, 3, 4))}
            save_file(state, str(folder / f"model{index}.safetensors"))
        else:
            torch.save(state, folder / f"pytorch_model{index}.bin")


def seeded(seed: int) -> Unet3D:
    torch.manual_seed(seed)
    return Unet3D(TINY)


@pytest.mark.parametrize(("module_prefix", "safetensors"), [(False, False), (True, False), (False, True), (True, True)])
def test_accelerate_folder_loads_ema_strict(tmp_path, module_prefix, safetensors):
    raw, ema = seeded(1), seeded(2)
    folder = tmp_path / "1000_ckpt"
    write_accelerate_folder(folder, raw, ema, module_prefix=module_prefix, safetensors=safetensors)

    loaded = load_checkpoint(folder, TINY)
    assert loaded.weights == "ema"
    assert len(loaded.sha256) == 64
    for key, tensor in ema.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key

    raw_loaded = load_checkpoint(folder, TINY, use_ema=False)
    assert torch.equal(raw_loaded.model.init_conv.weight, raw.init_conv.weight)


def test_mismatched_architecture_lists_keys(tmp_path):
    other = UnetConfig(dim=8, dim_mults=(1, 2, 4), channels=4, heads=2, dim_head=8, cond_dim=16, text_tokens=6)
    folder = tmp_path / "ckpt"
    write_accelerate_folder(folder, Unet3D(other), Unet3D(other))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(folder, TINY)
    message = str(caught.value)
    assert "unexpected (first: downs.1.3.weight" in message
    assert "another shape" in message
    assert "\n" not in message


def test_foreign_state_dict_rejected(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"encoder.weight": torch.zeros(2)}, folder / "pytorch_model_1.bin")
    with pytest.raises(CheckpointError, match="does not start with 'denoise_fn.'"):
        load_checkpoint(folder, TINY)


def test_truncated_checkpoint_rejected(tmp_path):
    folder = tmp_path / "ckpt"
    write_accelerate_folder(folder, seeded(1), seeded(2))
    path = folder / "pytorch_model_1.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(folder, TINY)


def test_missing_checkpoint_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing", TINY)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no pytorch_model_1.bin or model_1.safetensors"):
        load_checkpoint(empty, TINY)


def test_own_safetensors_round_trip(tmp_path):
    model = seeded(3)
    path = save_safetensors(model, tmp_path / "model.safetensors")
    loaded = load_safetensors(path)
    assert loaded.config == TINY
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
    shared = [loaded.model.get_parameter(f"mid_spatial_attn{n}.fn.fn.fn.to_qkv.weight") for n in (1, 2, 3, 4)]
    assert all(tensor is shared[0] for tensor in shared)


def test_plain_safetensors_without_config_rejected(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="no medsyn-xai config metadata"):
        load_checkpoint(path, TINY)


def test_up_path_orders_share_weights_but_differ():
    torch.manual_seed(0)
    inference = Unet3D(TINY).eval()
    training = Unet3D(UnetConfig(**{**TINY.to_dict(), "dim_mults": (1, 2), "up_path_order": "training"})).eval()
    training.load_state_dict(inference.state_dict(), strict=True)

    x = torch.randn(1, 4, 4, 8, 8)
    t = torch.tensor([300.0])
    context = torch.randn(1, 6, 16)
    with torch.inference_mode():
        assert not torch.allclose(inference(x, t, context), training(x, t, context))


def test_input_size_must_divide():
    model = Unet3D(TINY).eval()
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.zeros(1, 4, 2, 7, 8), torch.tensor([1.0]), torch.zeros(1, 6, 16))
