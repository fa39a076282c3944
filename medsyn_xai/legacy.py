"""Import per-token heatmaps written by the original Medsyn_XAI scripts into a study store.

Those scripts saved one NumPy file per token position of one generated sample::

    <study>_sample_<n>_token_<index>_<token>_heatmaps.npy     float32 (d, h, w), (64, 8, 8)

:func:`import_legacy` turns one such folder into a study store that the explain
job and every reader accept. A legacy store differs from a sampled one in four
ways, all recorded in its group attributes:

- ``saliency.method`` is "legacy_import". The maps are stored as found, and a
  token position without a file contains zeros, so the maps need not sum to 1 at
  each voxel as captured maps do. They are checked to be finite and non-negative.
- ``ct`` is all zeros on ``grid``, because the folders contain no volume, and
  ``ct_source`` is "none (legacy import)". There are no masks.
- ``seed`` is None, and ``sampler`` and ``model`` name "unknown (legacy import)".
- ``legacy`` records the source folder, study, sample, file count, the token
  positions without a file and the files whose token string differs from the
  re-tokenized prompt.

Token records come from re-tokenizing the prompt with the given text encoder,
so character offsets are right for entity alignment; the token strings in file
names are only compared, never trusted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog

from medsyn_xai.store import SampledStudy, validate_study_id, write_study
from medsyn_xai.text.tokens import TokenRecord

__all__ = ["LEGACY_FILE_PATTERN", "LegacyImportError", "LegacyTokenMap", "import_legacy", "scan_legacy_folder"]

log = structlog.get_logger(__name__)

LEGACY_FILE_PATTERN = re.compile(
    r"(?P<study>.+?)_sample_(?P<sample>\d+)_token_(?P<index>\d+)_(?P<token>.*)_heatmaps\.npy"
)
"""File name of one legacy token map; the study name is the shortest prefix that fits."""

_UNKNOWN = "unknown (legacy import)"


class LegacyImportError(ValueError):
    """A legacy folder that cannot be imported; the message names the file at fault."""


class _Tokenizer(Protocol):
    """The part of :class:`~medsyn_xai.text.encoder.TextEncoder` the import uses."""

    max_tokens: int

    @property
    def description(self) -> dict[str, object]: ...

    def tokenize(self, prompt: str) -> tuple[tuple[TokenRecord, ...], Any, bool, int]: ...


@dataclass(frozen=True)
class LegacyTokenMap:
    """One legacy file, parsed from its name.

    Attributes:
        path: the ``.npy`` file.
        study: study name at the start of the file name.
        sample: sample number.
        index: token position in the encoder's sequence, 0-based.
        token: token string as written in the file name.
    """

    path: Path
    study: str
    sample: int
    index: int
    token: str


def scan_legacy_folder(folder: Path | str) -> list[LegacyTokenMap]:
    """List the legacy token maps of ``folder`` in order of token index.

    Other files are skipped. Every map must belong to the same study and sample,
    and no token index may appear twice.

    Raises:
        LegacyImportError: the folder is missing or contains no legacy maps, or two
            files disagree on study or sample, or repeat a token index.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LegacyImportError(f"legacy folder '{folder}' not found: pass the folder of *_heatmaps.npy files")

    maps: list[LegacyTokenMap] = []
    skipped = 0
    for path in sorted(folder.iterdir()):
        match = LEGACY_FILE_PATTERN.fullmatch(path.name)
        if match is None or not path.is_file():
            skipped += 1
            continue
        maps.append(
            LegacyTokenMap(
                path=path,
                study=match["study"],
                sample=int(match["sample"]),
                index=int(match["index"]),
                token=match["token"],
            )
        )
    if not maps:
        message = (
            f"no legacy token maps in '{folder}': expected files named "
            "<study>_sample_<n>_token_<index>_<token>_heatmaps.npy"
        )
        raise LegacyImportError(message)
    if skipped:
        log.info("legacy_files_skipped", path=str(folder), n_skipped=skipped)

    first = maps[0]
    by_index: dict[int, LegacyTokenMap] = {}
    for item in maps:
        if (item.study, item.sample) != (first.study, first.sample):
            message = (
                f"legacy file '{item.path.name}' is study {item.study!r} sample {item.sample} but "
                f"'{first.path.name}' is study {first.study!r} sample {first.sample}: "
                "put the maps of one sample in a folder of their own"
            )
            raise LegacyImportError(message)
        if item.index in by_index:
            message = (
                f"legacy file '{item.path.name}' repeats token index {item.index} of "
                f"'{by_index[item.index].path.name}': keep one file per token index"
            )
            raise LegacyImportError(message)
        by_index[item.index] = item
    return [by_index[index] for index in sorted(by_index)]


def import_legacy(
    folder: Path | str,
    prompt: str,
    out_root: Path | str,
    *,
    text_encoder: _Tokenizer,
    study_id: str | None = None,
    grid: tuple[int, int, int] = (64, 64, 64),
    spacing_mm: tuple[float, float, float] = (5.0, 6.0, 6.0),
    overwrite: bool = False,
) -> Path:
    """Write the legacy token maps of ``folder`` as a study store under ``out_root``.

    Args:
        folder: folder of ``<study>_sample_<n>_token_<index>_<token>_heatmaps.npy``
            files, each a float (d, h, w) array, all of one shape.
        prompt: the report text the sample was generated from.
        out_root: data root; the store goes to ``out_root/studies/<id>.zarr``.
        text_encoder: encoder whose tokenizer produced the legacy token indices
            (CXR-BERT with 192 positions for MedSyn); only its tokenizer runs.
        study_id: id of the new study. None uses the study name of the files.
            Default: None.
        grid: (Z, Y, X) voxels of the all-zero CT written in place of the
            missing volume. Default: (64, 64, 64).
        spacing_mm: voxel size (z, y, x) of that CT in millimetres.
            Default: (5.0, 6.0, 6.0).
        overwrite: replace an existing study with the same id. Default: False.

    Returns:
        Path of the written ``.zarr`` folder; its ``.sampled`` marker exists.

    Raises:
        LegacyImportError: the folder contains no maps, or maps of several samples,
            or a map has another shape, a non-float dtype, NaN, infinite or
            negative values, or a token index past the encoder's positions.
        InvalidStudyIdError: neither ``study_id`` nor the files' study name is a
            valid study id.
        StudyExistsError: the study exists and ``overwrite`` is False.
    """
    if len(grid) != 3 or any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in grid):
        raise LegacyImportError(f"invalid grid {grid!r}: pass three positive voxel counts (Z, Y, X)")
    folder = Path(folder)
    legacy_maps = scan_legacy_folder(folder)
    first = legacy_maps[0]
    if study_id is None and not _is_valid_study_id(first.study):
        message = (
            f"legacy study name {first.study!r} of '{first.path.name}' is not a valid study id: "
            "pass --study-id with 1-128 characters from A-Z a-z 0-9 . _ -"
        )
        raise LegacyImportError(message)
    study_id = validate_study_id(study_id if study_id is not None else first.study)
    bound = log.bind(study_id=study_id, path=str(folder))

    # 1. Token records of the prompt, padded to the encoder's T positions.
    records, _, truncated, n_prompt_tokens = text_encoder.tokenize(prompt)
    n_tokens = len(records)
    last = legacy_maps[-1]
    if last.index >= n_tokens:
        message = (
            f"legacy file '{last.path.name}' has token index {last.index} but the text encoder has "
            f"{n_tokens} positions (0 to {n_tokens - 1}): set text.max_tokens to the legacy model's "
            "token count, 192 for MedSyn"
        )
        raise LegacyImportError(message)

    # 2. Place each map at its token index; positions without a file stay zero.
    # NOTE: the legacy maps are assumed to use this project's "zyx" axis order and
    # orientation. The old scripts recorded no orientation, so nothing checks it.
    first_map = _load_map(first.path)
    native_shape = first_map.shape
    saliency = np.zeros((n_tokens, *native_shape), dtype=np.float32)  # (T, d, h, w)
    mismatches: list[dict[str, Any]] = []
    for item in legacy_maps:
        token_map = first_map if item is first else _load_map(item.path)
        if token_map.shape != native_shape:
            message = (
                f"legacy file '{item.path.name}' has shape {token_map.shape} but "
                f"'{first.path.name}' has {native_shape}: every token map needs the same (d, h, w)"
            )
            raise LegacyImportError(message)
        saliency[item.index] = token_map
        if item.token != records[item.index].text:
            mismatches.append({"index": item.index, "file_token": item.token, "token": records[item.index].text})

    if mismatches:
        bound.warning(
            "legacy_token_mismatch",
            n_mismatches=len(mismatches),
            first=mismatches[0],
            hint="check that the prompt and text encoder are the ones the legacy maps came from",
        )
    present = {item.index for item in legacy_maps}
    missing = [index for index in range(n_tokens) if index not in present]

    # 3. A store with an all-zero CT and provenance that marks what is unknown.
    attrs: dict[str, Any] = {
        "seed": None,
        "sampler": {"method": _UNKNOWN},
        "model": {"name": _UNKNOWN, "checkpoint_sha256": None},
        "text_encoder": text_encoder.description,
        "saliency": {
            "method": "legacy_import",
            "normalized": False,
            "native_shape": list(native_shape),
        },
        "ct_source": "none (legacy import)",
        "truncated": truncated,
        "prompt_tokens": n_prompt_tokens,
        "legacy": {
            "folder": str(folder.resolve()),
            "study": first.study,
            "sample": first.sample,
            "n_files": len(legacy_maps),
            "missing_token_indices": missing,
            "token_mismatches": mismatches,
        },
    }
    study = SampledStudy(
        study_id=study_id,
        prompt=prompt,
        ct=np.zeros(grid, dtype=np.int16),
        masks={},
        tokens=[record.to_dict() for record in records],
        saliency=saliency,
        spacing_mm=spacing_mm,
        attrs=attrs,
    )
    path = write_study(out_root, study, overwrite=overwrite)
    bound.info("legacy_imported", store=str(path), n_files=len(legacy_maps), n_missing=len(missing))
    return path


def _is_valid_study_id(name: str) -> bool:
    try:
        validate_study_id(name)
    except ValueError:
        return False
    return True


def _load_map(path: Path) -> np.ndarray:
    """Read one legacy map as float32 (d, h, w) and reject other layouts and invalid values."""
    try:
        token_map = np.load(path, allow_pickle=False)
    except ValueError as error:
        # numpy's message for a file it takes as a pickle suggests allow_pickle, which would run code from the file.
        detail = "no .npy header, or Python objects inside" if "allow_pickle" in str(error) else str(error)
        message = f"legacy file '{path.name}' is not a readable .npy array ({detail}): export it again as float32"
        raise LegacyImportError(message) from None
    except OSError as error:
        raise LegacyImportError(f"legacy file '{path.name}' is not a readable .npy array ({error})") from None
    if token_map.ndim != 3 or 0 in token_map.shape:
        message = f"legacy file '{path.name}' has shape {token_map.shape}: expected one non-empty (d, h, w) map per token"
        raise LegacyImportError(message)
    if not np.issubdtype(token_map.dtype, np.floating):
        raise LegacyImportError(f"legacy file '{path.name}' has dtype {token_map.dtype}: expected a float array")
    if not np.isfinite(token_map).all():
        raise LegacyImportError(f"legacy file '{path.name}' contains NaN or infinite values: export it again")
    if token_map.size and float(token_map.min()) < 0:
        message = (
            f"legacy file '{path.name}' contains negative values, which attention maps cannot have: export it again"
        )
        raise LegacyImportError(message)
    return token_map.astype(np.float32, copy=False)
