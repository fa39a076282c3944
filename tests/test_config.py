"""Settings: TOML loading, environment overrides and rejection of bad keys."""

from pathlib import Path

import pytest

from medsyn_xai.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


def test_defaults_without_file():
    settings = load_settings(environ={})
    assert settings == Settings()


def test_default_toml_equals_builtin_defaults():
    assert load_settings(REPO / "config" / "default.toml", environ={}) == Settings()


def test_official_toml_loads():
    settings = load_settings(REPO / "config" / "medsyn_official.toml", environ={})
    assert settings.model.dim == 160
    assert settings.model.dim_mults == (1, 2, 4, 8)
    assert settings.text.max_tokens == 192


def test_toml_values_are_typed(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\ndim_mults = [1, 2]\n[sampler]\nguidance_scale = 3\n[output]\ngrid = [8, 16, 16]\n")
    settings = load_settings(path, environ={})
    assert settings.model.dim_mults == (1, 2)
    assert settings.sampler.guidance_scale == 3.0
    assert isinstance(settings.sampler.guidance_scale, float)
    assert settings.output.grid == (8, 16, 16)


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[sampler]\nsteps = 10\n")
    settings = load_settings(path, environ={"MEDSYN_XAI__SAMPLER__STEPS": "7", "MEDSYN_XAI__TEXT__FOLDER": "/x/y"})
    assert settings.sampler.steps == 7
    assert settings.text.folder == "/x/y"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[sampler]\nstepz = 3\n", "unknown setting 'sampler.stepz'"),
        ("[samplr]\nsteps = 3\n", "unknown setting 'samplr'"),
        ("[sampler]\nsteps = 'ten'\n", "'sampler.steps' must be an integer"),
        ("[sampler]\nsteps = true\n", "'sampler.steps' must be an integer"),
        ("[model]\nuse_ema = 1\n", "'model.use_ema' must be true or false"),
        ("[output]\ngrid = [64, 64]\n", "'output.grid' must have 3 items"),
        ("[model]\nup_path_order = 'sideways'\n", "'model.up_path_order' is 'sideways'"),
        ("sampler = 3\n", "setting 'sampler' must be a table"),
    ],
)
def test_bad_settings_rejected_by_name(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_environment_key_rejected():
    with pytest.raises(ConfigError, match="unknown setting 'sampler.nope'"):
        load_settings(environ={"MEDSYN_XAI__SAMPLER__NOPE": "1"})


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[sampler\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken, environ={})
