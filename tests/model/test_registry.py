"""Model selection: shipped default weights, explicit random initialisation."""

from medsyn_xai.config import ModelSettings
from medsyn_xai.model.registry import default_weights_path, load_model


def test_default_weights_are_shipped():
    path = default_weights_path()
    assert path is not None
    assert path.stat().st_size < 25 * 1024 * 1024


def test_empty_checkpoint_loads_shipped_model():
    loaded = load_model(ModelSettings())
    assert loaded.weights == "file"
    assert loaded.source == str(default_weights_path())
    assert len(loaded.sha256) == 64
    assert loaded.native_shape == (16, 16, 16)
    assert loaded.channel_names == ("ct", "lobes", "airway", "vessels", "lesion")
    assert loaded.config.cond_dim == 384


def test_none_checkpoint_is_random_init():
    first = load_model(ModelSettings(checkpoint="none", dim=8, dim_mults=(1, 2), heads=2, dim_head=8))
    second = load_model(ModelSettings(checkpoint="none", dim=8, dim_mults=(1, 2), heads=2, dim_head=8))
    assert first.weights == "random-init"
    assert first.sha256 == ""
    assert first.native_shape is None
    for key, tensor in first.model.state_dict().items():
        assert (second.model.state_dict()[key] == tensor).all(), key
