"""Shared fixtures: a tiny denoiser configuration and the bundled text encoder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import subprocess
import sys
from pathlib import Path

import pytest

from medsyn_xai.config import ModelSettings, OutputSettings, SamplerSettings, Settings, TextSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENS = 24

TINY_CONFIG_TOML = f"""
[text]
max_tokens = {TINY_TOKENS}

[model]
checkpoint = "none"
dim = 8
dim_mults = [1, 2]
heads = 2
dim_head = 8
text_tokens = {TINY_TOKENS}
depth = 8
height = 16
width = 16

[sampler]
steps = 3
device = "cpu"

[output]
grid = [16, 16, 16]
"""


@pytest.fixture(scope="session")
def tiny_settings() -> Settings:
    """Settings of a denoiser small enough to sample in well under a second."""
    return Settings(
        text=TextSettings(max_tokens=TINY_TOKENS),
        model=ModelSettings(
            checkpoint="none", dim=8, dim_mults=(1, 2), heads=2, dim_head=8, text_tokens=TINY_TOKENS,
            depth=8, height=16, width=16,
        ),
        sampler=SamplerSettings(steps=3, device="cpu"),
        output=OutputSettings(grid=(16, 16, 16)),
    )


@pytest.fixture()
def tiny_config_file(tmp_path: Path) -> Path:
    """A TOML settings file selecting the tiny denoiser."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_CONFIG_TOML)
    return path


@pytest.fixture(scope="session")
def text_encoder():
    """The bundled MiniLM encoder, loaded once per test session."""
    from medsyn_xai.text.encoder import TextEncoder

    return TextEncoder(max_tokens=TINY_TOKENS)


def run_cli(*args, cwd: Path = REPO_ROOT, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``medsyn-xai`` in a subprocess with the Hub disabled; ``check`` raises on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-m", "medsyn_xai.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=cwd,
        timeout=240,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {result.stderr[-2000:]}")
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """Return the single ``medsyn-xai: error:`` line of a failed run."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("medsyn-xai: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]
