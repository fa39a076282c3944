"""The study store: one Zarr v3 group per generated CT study, completion markers and NIfTI export.

Layout under one data root per deployment::

    <root>/studies/<id>.zarr        Zarr v3 group, attribute format_version = 1
    <root>/studies/<id>.sampled     JSON marker, written last by write_study
    <root>/studies/<id>.explained   JSON marker, written last by write_entities
    <root>/studies/<id>.failed      JSON marker {"stage", "error", "detail"}

Nodes of ``<id>.zarr``:

    group attrs          study_id, prompt, created_at (UTC ISO 8601), seed, sampler,
                         model, text_encoder, software_version, axes "zyx",
                         spacing_mm [z, y, x], tokens, plus any extra caller attrs
    ct                   int16 (Z, Y, X), Hounsfield units
    masks/<name>         uint8 (Z, Y, X), one array per mask channel, listed in channel
                         order by the masks group attribute "names"
    saliency/tokens      float32 (T, d, h, w), chunks (1, d, h, w), T == len(tokens)
    entities             group attrs: entities (list of dicts), backend, backend_version
    entities/heatmaps    float32 (E, Z', Y', X'), chunks (1, Z', Y', X'), E may be 0

Readers trust a store only after its marker exists: a ``.zarr`` folder without
``.sampled`` may still be half written, and an ``entities`` group without
``.explained`` may be stale or incomplete.

Orientation, used by the whole project: an array index (z, y, x) has x running from
the patient's right to left, y from anterior to posterior and z from inferior to
superior, so the voxel axes point L, P, S. NIfTI files store the data transposed to
(x, y, z) order with a RAS+ affine ``diag(-sx, -sy, sz, 1)``, where
``(sz, sy, sx) = spacing_mm``, and an origin chosen so that the centre of the volume
lies at world (0, 0, 0) mm.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import structlog
import zarr

from medsyn_xai import __version__
from medsyn_xai.chunk_io import write_rows

__all__ = [
    "FORMAT_VERSION",
    "STUDY_ID_PATTERN",
    "InvalidStudyIdError",
    "SampledStudy",
    "StoreCorruptError",
    "StoreError",
    "StoreNotReadyError",
    "StudyExistsError",
    "StudyNotFoundError",
    "StudyStore",
    "export_nifti",
    "list_studies",
    "marker_path",
    "nifti_affine",
    "remove_abandoned_temporaries",
    "studies_dir",
    "study_path",
    "validate_study_id",
    "write_entities",
    "write_failed_marker",
    "write_study",
]

log = structlog.get_logger(__name__)

STUDY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FORMAT_VERSION = 1

MarkerKind = Literal["sampled", "explained", "failed"]
MARKER_KINDS: tuple[MarkerKind, ...] = ("sampled", "explained", "failed")

_FORBIDDEN_ID_SUFFIXES = (".zarr", ".tmp")
_STUDY_ID_RULE = "use 1-128 characters from A-Z a-z 0-9 . _ - starting with a letter or digit"
_TOKEN_KEYS = ("index", "text", "start", "end", "special")
# write_study sets these group attributes from SampledStudy fields, so attrs may not carry them.
_RESERVED_ATTRS = ("format_version", "study_id", "prompt", "axes", "spacing_mm", "tokens")
_REQUIRED_ATTRS = ("seed", "sampler", "model", "text_encoder")
_ENTITY_GROUP_KEYS = ("entities", "backend", "backend_version")
_OVERWRITE_HINT = "pass overwrite=True (--overwrite on the command line) to replace it"


class StoreError(Exception):
    """Base class of every error raised by the study store."""


class InvalidStudyIdError(StoreError, ValueError):
    """A study id that cannot be used as a file name in the store."""


class StudyExistsError(StoreError):
    """A study with this id (folder or marker) already exists and overwrite was not requested."""


class StoreNotReadyError(StoreError):
    """A study whose marker is missing, so its contents may be incomplete."""


class StudyNotFoundError(StoreNotReadyError, FileNotFoundError):
    """A study folder that does not exist (yet)."""


class StoreCorruptError(StoreError):
    """A study whose nodes are missing, of the wrong shape or dtype, or hold invalid values."""


def validate_study_id(study_id: str) -> str:
    """Check that ``study_id`` is safe as a file name and return it unchanged.

    A valid id is 1-128 characters from ``A-Z a-z 0-9 . _ -``, starts with a letter
    or digit and does not end with ``.zarr`` or ``.tmp``. Raises InvalidStudyIdError.
    """
    if not isinstance(study_id, str):
        message = f"invalid study id {study_id!r} of type {type(study_id).__name__}: pass a string and {_STUDY_ID_RULE}"
        raise InvalidStudyIdError(message)
    if STUDY_ID_PATTERN.fullmatch(study_id) is None:
        raise InvalidStudyIdError(f"invalid study id {study_id!r}: {_STUDY_ID_RULE}")
    if study_id.lower().endswith(_FORBIDDEN_ID_SUFFIXES):
        message = f"invalid study id {study_id!r}: the id may not end with .zarr or .tmp, so remove that suffix"
        raise InvalidStudyIdError(message)
    return study_id


def studies_dir(root: Path | str) -> Path:
    """Return ``<root>/studies``, the folder of study stores and markers. It is not created."""
    return Path(root) / "studies"


def study_path(root: Path | str, study_id: str) -> Path:
    """Return ``<root>/studies/<study_id>.zarr`` after validating ``study_id``."""
    validate_study_id(study_id)
    return studies_dir(root) / f"{study_id}.zarr"


def marker_path(root: Path | str, study_id: str, kind: MarkerKind) -> Path:
    """Return ``<root>/studies/<study_id>.<kind>`` for kind "sampled", "explained" or "failed"."""
    validate_study_id(study_id)
    if kind not in MARKER_KINDS:
        raise ValueError(f"invalid marker kind {kind!r}: use one of {', '.join(MARKER_KINDS)}")
    return studies_dir(root) / f"{study_id}.{kind}"


@dataclass
class SampledStudy:
    """Everything the sampler produced for one prompt, ready for :func:`write_study`.

    Attributes:
        study_id: id matching ``STUDY_ID_PATTERN``, used as the ``.zarr`` folder name.
        prompt: the report text the volume was generated from.
        ct: int16 (Z, Y, X) volume in Hounsfield units, axes "zyx" (L, P, S).
        masks: mask name -> uint8 (Z, Y, X) array on the CT grid, in channel order.
            Names follow the study id rules because they become node and file names.
        tokens: one dict {index, text, start, end, special} per token position of the
            encoder, padding included, with ``tokens[i]["index"] == i``.
        saliency: float32 (T, d, h, w) token maps on the model's native grid, with
            T == len(tokens), finite and non-negative.
        spacing_mm: voxel size (z, y, x) of ``ct`` in millimetres.
        attrs: provenance stored as group attributes. Required keys: seed, sampler
            (dict), model (dict with name and checkpoint_sha256) and text_encoder
            (dict). Optional keys: created_at and software_version, which are filled
            in when missing, and any other JSON-compatible values.
    """

    study_id: str
    prompt: str
    ct: np.ndarray
    masks: dict[str, np.ndarray]
    tokens: list[dict[str, Any]]
    saliency: np.ndarray
    spacing_mm: tuple[float, float, float]
    attrs: dict[str, Any] = field(default_factory=dict)


def write_study(root: Path | str, study: SampledStudy, *, overwrite: bool = False) -> Path:
    """Write ``study`` to ``<root>/studies/<id>.zarr`` and then its ``.sampled`` marker.

    The group is written to a hidden temporary folder next to the final one and moved
    into place with ``os.replace``, so readers never see a half-written store. With
    ``overwrite=True`` the old markers are removed first, then the old store, and the
    new one takes its place. If anything fails, the temporary folder is removed and
    no ``.sampled`` marker exists. A failure while writing the marker itself leaves
    the new ``.zarr`` folder without a marker, which readers ignore and which a
    rerun with ``overwrite=True`` replaces.

    Args:
        root: data root of the deployment. ``studies/`` is created when missing.
        study: the arrays, tokens and provenance to store.
        overwrite: replace an existing study of the same id. Default: False.

    Returns:
        Path of the ``.zarr`` folder.

    Raises:
        InvalidStudyIdError: the id is not valid.
        ValueError: an array has the wrong dtype or shape, or attrs are incomplete.
        StudyExistsError: the study exists and ``overwrite`` is False.
        StoreError: the output folder is not writable.
    """
    # 1. Validate everything that can be checked without touching the disk.
    validate_study_id(study.study_id)
    _check_study(study)
    root = Path(root)
    final = study_path(root, study.study_id)
    bound = log.bind(study_id=study.study_id, path=str(final))

    # 2. Reject an existing study (folder or any marker) unless overwriting.
    existing = _existing_parts(root, study.study_id)
    if existing and not overwrite:
        message = (
            f"study {study.study_id!r} already exists in '{studies_dir(root)}' "
            f"({', '.join(existing)}): {_OVERWRITE_HINT}"
        )
        raise StudyExistsError(message)

    # 3. Write the whole group into a hidden temporary folder in the same studies folder.
    created_at = str(study.attrs.get("created_at") or _utc_now())
    software_version = str(study.attrs.get("software_version") or __version__)
    folder = _make_studies_dir(root)
    temporary = folder / f".{study.study_id}.zarr.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        try:
            temporary.mkdir()
        except OSError as error:
            raise _not_writable(root, error) from error
        _write_group(temporary, study, created_at=created_at, software_version=software_version)

        # 4. Replace the old study: markers first, so no reader trusts a store in transit.
        if existing:
            for kind in MARKER_KINDS:
                marker_path(root, study.study_id, kind).unlink(missing_ok=True)
            _remove_tree_aside(final)
        try:
            os.replace(temporary, final)
        except OSError as error:
            if final.exists():
                message = f"study {study.study_id!r} was created by another writer at '{final}': {_OVERWRITE_HINT}"
                raise StudyExistsError(message) from error
            raise
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

    # 5. Publish: the marker is the last thing written.
    payload = {
        "study_id": study.study_id,
        "created_at": created_at,
        "software_version": software_version,
        "path": final.relative_to(root).as_posix(),
    }
    _write_json_atomic(marker_path(root, study.study_id, "sampled"), payload)
    bound.info("study_written", replaced=bool(existing), n_tokens=len(study.tokens), masks=list(study.masks))
    return final


def _check_study(study: SampledStudy) -> None:
    """Raise ValueError naming the first field of ``study`` that cannot be stored."""
    if not isinstance(study.prompt, str):
        raise ValueError(f"invalid prompt of type {type(study.prompt).__name__}: pass the report text as a string")
    _check_array("ct", study.ct, np.int16, ndim=3)
    if study.ct.size == 0:
        raise ValueError(f"invalid array 'ct' of shape {study.ct.shape}: every axis needs at least one voxel")
    _check_spacing(study.spacing_mm)

    for name, mask in study.masks.items():
        _check_mask_name(name)
        _check_array(f"masks/{name}", mask, np.uint8, ndim=3)
        if mask.shape != study.ct.shape:
            message = f"invalid array 'masks/{name}' of shape {mask.shape}: expected the CT shape {study.ct.shape}"
            raise ValueError(message)

    _check_tokens(study.tokens)
    _check_array("saliency", study.saliency, np.float32, ndim=4)
    if study.saliency.shape[0] != len(study.tokens):
        message = (
            f"invalid array 'saliency' of shape {study.saliency.shape}: its first axis must equal "
            f"the number of tokens ({len(study.tokens)})"
        )
        raise ValueError(message)
    if not np.isfinite(study.saliency).all():
        raise ValueError("invalid array 'saliency': it contains NaN or infinite values, so check the attention capture")
    if study.saliency.size and float(study.saliency.min()) < 0:
        raise ValueError("invalid array 'saliency': it contains negative values, so check the attention capture")

    reserved = [key for key in _RESERVED_ATTRS if key in study.attrs]
    if reserved:
        message = f"invalid attrs keys {reserved}: write_study sets them, so pass them as SampledStudy fields"
        raise ValueError(message)
    missing = [key for key in _REQUIRED_ATTRS if key not in study.attrs]
    if missing:
        message = (
            f"missing provenance attrs {missing}: add them to SampledStudy.attrs (required: {list(_REQUIRED_ATTRS)})"
        )
        raise ValueError(message)


def _check_array(name: str, array: Any, dtype: type[np.generic], *, ndim: int) -> None:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"invalid array {name!r} of type {type(array).__name__}: pass a numpy array")
    if array.dtype != dtype:
        message = f"invalid array {name!r} with dtype {array.dtype}: expected {np.dtype(dtype).name}, so cast it"
        raise ValueError(message)
    if array.ndim != ndim:
        raise ValueError(f"invalid array {name!r} of shape {array.shape}: expected {ndim} axes")


def _check_spacing(spacing_mm: Any) -> None:
    values = list(spacing_mm) if isinstance(spacing_mm, (tuple, list, np.ndarray)) else []
    valid = len(values) == 3 and all(
        isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0 for value in values
    )
    if not valid:
        raise ValueError(f"invalid spacing_mm {spacing_mm!r}: pass three positive voxel sizes (z, y, x) in mm")


def _check_mask_name(name: Any) -> None:
    if not isinstance(name, str) or STUDY_ID_PATTERN.fullmatch(name) is None:
        raise ValueError(f"invalid mask name {name!r}: {_STUDY_ID_RULE}")


def _check_tokens(tokens: Any) -> None:
    if not isinstance(tokens, list):
        raise ValueError(f"invalid tokens of type {type(tokens).__name__}: pass a list of dicts")
    for position, token in enumerate(tokens):
        if not isinstance(token, Mapping):
            raise ValueError(f"invalid token {position}: expected a dict with keys {list(_TOKEN_KEYS)}")
        missing = [key for key in _TOKEN_KEYS if key not in token]
        if missing:
            raise ValueError(f"invalid token {position} {dict(token)!r}: missing keys {missing}")
        if token["index"] != position:
            message = (
                f"invalid token {position}: its index is {token['index']!r}, "
                f"expected {position} because the list needs one entry per token position"
            )
            raise ValueError(message)


def _existing_parts(root: Path, study_id: str) -> list[str]:
    """Return which of the study's folder and markers exist, as names like "zarr" or "sampled"."""
    parts = ["zarr"] if study_path(root, study_id).exists() else []
    parts += [kind for kind in MARKER_KINDS if marker_path(root, study_id, kind).exists()]
    return parts


def remove_abandoned_temporaries(root: Path | str, *, older_than_seconds: float) -> list[Path]:
    """Delete hidden ``.<id>.zarr.tmp-*`` folders that a killed writer left in ``<root>/studies``.

    A folder counts as abandoned when nothing inside it changed for
    ``older_than_seconds``. A live writer finishes a study in seconds, so a
    threshold of the queue's lease (30 s by default) or longer is safe.

    Returns:
        The removed folders. A folder that disappears or cannot be removed
        meanwhile is skipped and logged.
    """
    folder = studies_dir(root)
    if not folder.is_dir():
        return []
    now = datetime.now(timezone.utc).timestamp()
    removed = []
    for path in folder.glob(".*.zarr.tmp-*"):
        try:
            newest = max([path.stat().st_mtime, *(entry.stat().st_mtime for entry in path.rglob("*"))])
            if now - newest <= older_than_seconds:
                continue
            shutil.rmtree(path)
        except OSError as error:
            log.warning("temporary_not_removed", path=str(path), error=str(error))
            continue
        removed.append(path)
        log.info("abandoned_temporary_removed", path=str(path), idle_seconds=round(now - newest, 1))
    return removed


def _make_studies_dir(root: Path) -> Path:
    folder = studies_dir(root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _not_writable(root, error) from error
    return folder


def _not_writable(root: Path, error: OSError) -> StoreError:
    reason = error.strerror or type(error).__name__
    return StoreError(f"output folder '{root}' is not writable ({reason}): choose another --out or fix its permissions")


def _write_group(folder: Path, study: SampledStudy, *, created_at: str, software_version: str) -> None:
    """Write every node and attribute of ``study`` into a new Zarr v3 group at ``folder``."""
    group = zarr.open_group(folder, mode="w", zarr_format=3)
    shape_zyx = study.ct.shape

    group.create_array("ct", data=study.ct, chunks=shape_zyx)
    masks = group.create_group("masks")
    for name, mask in study.masks.items():
        masks.create_array(name, data=mask, chunks=shape_zyx)
    masks.attrs["names"] = list(study.masks)

    # One chunk per token, all in one uncompressed shard: a reader that loads every
    # token map touches one file instead of T, which made reading a 192-token store
    # about 1.6 times faster (zarr 3.1, 2-core CPU), while one token map stays
    # addressable on its own.
    saliency = group.create_group("saliency")
    n_tokens, depth, height, width = study.saliency.shape
    saliency.create_array(
        "tokens",
        data=study.saliency,
        chunks=(1, depth, height, width),
        shards=(max(n_tokens, 1), depth, height, width),
        compressors=None,
    )

    attrs = _to_json(dict(study.attrs), "attrs")
    attrs.update(
        created_at=created_at,
        software_version=software_version,
        format_version=FORMAT_VERSION,
        study_id=study.study_id,
        prompt=study.prompt,
        axes="zyx",
        spacing_mm=[float(value) for value in study.spacing_mm],
        tokens=[_token_to_json(token) for token in study.tokens],
    )
    group.attrs.update(attrs)


def _token_to_json(token: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "index": int(token["index"]),
        "text": str(token["text"]),
        "start": int(token["start"]),
        "end": int(token["end"]),
        "special": bool(token["special"]),
    }


def _to_json(value: Any, where: str) -> Any:
    """Convert ``value`` to plain JSON types (numpy scalars and arrays, tuples, paths included).

    Raises TypeError naming the attribute at ``where`` for any other type.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _to_json(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
    message = (
        f"invalid attribute {where} of type {type(value).__name__}: "
        "store numbers, strings, booleans, None, lists or dicts instead"
    )
    raise TypeError(message)


def _remove_tree_aside(folder: Path) -> None:
    """Rename ``folder`` to a hidden name, then delete it, so its final name is free at once."""
    if not folder.exists():
        return
    aside = folder.with_name(f".{folder.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(folder, aside)
    shutil.rmtree(aside)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` through a synced temporary file and ``os.replace``."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries so a rename inside it survives a crash (POSIX only)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _corrupt(path: Path, detail: str) -> StoreCorruptError:
    return StoreCorruptError(f"study store '{path}' is corrupt: {detail}: write the study again with --overwrite")


def _check_layout(path: Path, study_id: str, group: zarr.Group) -> dict[str, zarr.Array]:
    """Check the attributes and nodes every reader needs, without reading array data.

    Returns the ``ct`` and ``saliency/tokens`` arrays it opened, by node name.
    """
    attrs = group.attrs
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        message = (
            f"study store '{path}' has format_version {version!r}, expected {FORMAT_VERSION}: "
            "write it again with this version of medsyn-xai"
        )
        raise StoreCorruptError(message)
    for key in ("study_id", "prompt", "tokens", "spacing_mm"):
        if key not in attrs:
            raise _corrupt(path, f"group attribute {key!r} is missing")
    if attrs["study_id"] != study_id:
        raise _corrupt(path, f"group attribute study_id is {attrs['study_id']!r} but the folder is named {study_id!r}")
    if not isinstance(attrs["tokens"], list) or not all(isinstance(token, dict) for token in attrs["tokens"]):
        raise _corrupt(path, "group attribute 'tokens' is not a list of dicts")
    spacing = attrs["spacing_mm"]
    if (
        not isinstance(spacing, list)
        or len(spacing) != 3
        or not all(isinstance(value, (int, float)) for value in spacing)
    ):
        raise _corrupt(path, f"group attribute spacing_mm is {spacing!r}, expected [z, y, x] in mm")
    arrays = {}
    for node in ("ct", "saliency/tokens"):
        array = group.get(node)
        if not isinstance(array, zarr.Array):
            raise _corrupt(path, f"array {node!r} is missing")
        arrays[node] = array
    if not isinstance(group.get("masks"), zarr.Group):
        raise _corrupt(path, "group 'masks' is missing")
    return arrays


class StudyStore:
    """Read access to one study written by :func:`write_study`.

    Open with :meth:`open`. The attributes ``attrs``, ``prompt``, ``tokens`` and
    ``spacing_mm`` are read once at open. Array properties read from disk on every
    access, so keep the result if you need it twice.
    """

    def __init__(
        self, path: Path, group: zarr.Group, study_id: str, arrays: Mapping[str, zarr.Array] | None = None
    ) -> None:
        """Wrap an open group whose layout :meth:`open` has checked. Call :meth:`open` instead."""
        self.path = path
        self.root = path.parent.parent
        self.study_id = study_id
        self._group = group
        # Handles of the nodes a sampled store never changes (``ct``, ``saliency/tokens``),
        # so their metadata is read once. Their data is still read on every access.
        self._arrays: dict[str, zarr.Array] = dict(arrays or {})
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.prompt: str = str(self.attrs["prompt"])
        self.tokens: list[dict[str, Any]] = [dict(token) for token in self.attrs["tokens"]]
        size_z, size_y, size_x = (float(value) for value in self.attrs["spacing_mm"])
        self.spacing_mm: tuple[float, float, float] = (size_z, size_y, size_x)

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        require: Literal["sampled", "explained", None] = "sampled",
    ) -> StudyStore:
        """Open the ``<id>.zarr`` folder at ``path`` for reading.

        Args:
            path: the study's ``.zarr`` folder. Its markers are looked up next to it.
            require: marker that must exist: "sampled", "explained" (which also needs
                "sampled") or None to skip the check. Default: "sampled".

        Raises:
            StudyNotFoundError: the folder does not exist (a StoreNotReadyError and a
                FileNotFoundError).
            StoreNotReadyError: the required marker is missing.
            StoreCorruptError: wrong format_version, or a required attribute or node
                is missing.
        """
        path = Path(path)
        if path.suffix != ".zarr":
            raise StoreError(f"'{path}' is not a study store: pass the folder named <study id>.zarr")
        study_id = validate_study_id(path.stem)
        if require not in ("sampled", "explained", None):
            raise ValueError(f"invalid require {require!r}: use 'sampled', 'explained' or None")

        if not path.is_dir():
            message = f"study store '{path}' not found: check the path or wait for the sampler to write it"
            raise StudyNotFoundError(message)
        required: list[MarkerKind] = []
        if require in ("sampled", "explained"):
            required.append("sampled")
        if require == "explained":
            required.append("explained")
        for kind in required:
            marker = path.with_name(f"{study_id}.{kind}")
            if not marker.exists():
                message = (
                    f"study store '{path}' is not ready: marker '{marker.name}' is missing, "
                    f"so wait for the {kind} step to finish"
                )
                raise StoreNotReadyError(message)

        try:
            group = zarr.open_group(path, mode="r", zarr_format=3)
        except (FileNotFoundError, ValueError) as error:
            raise _corrupt(path, f"no readable Zarr v3 group ({error})") from error
        arrays = _check_layout(path, study_id, group)
        return cls(path, group, study_id, arrays)

    def _array(self, node: str) -> zarr.Array:
        if node in self._arrays:
            return self._arrays[node]
        array = self._group.get(node)
        if not isinstance(array, zarr.Array):
            raise _corrupt(self.path, f"array {node!r} is missing")
        return array

    def _subgroup(self, node: str) -> zarr.Group:
        group = self._group.get(node)
        if not isinstance(group, zarr.Group):
            raise _corrupt(self.path, f"group {node!r} is missing")
        return group

    def _marker_exists(self, kind: MarkerKind) -> bool:
        return self.path.with_name(f"{self.study_id}.{kind}").exists()

    @property
    def markers(self) -> list[str]:
        """Marker kinds that exist next to the store now, in the order sampled, explained, failed."""
        return [kind for kind in MARKER_KINDS if self._marker_exists(kind)]

    @property
    def ct(self) -> np.ndarray:
        """int16 (Z, Y, X) CT volume in Hounsfield units."""
        return np.asarray(self._array("ct")[...])

    @property
    def ct_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) size of the CT grid in voxels, from the array metadata without reading the volume."""
        return tuple(int(size) for size in self._array("ct").shape)

    @property
    def mask_names(self) -> list[str]:
        """Mask channel names in the order they were written (sorted for stores without that order)."""
        group = self._subgroup("masks")
        names = group.attrs.get("names")
        if not isinstance(names, list):
            return sorted(group.array_keys())
        return [str(name) for name in names]

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Mask name -> uint8 (Z, Y, X) array on the CT grid."""
        return {name: np.asarray(self._array(f"masks/{name}")[...]) for name in self.mask_names}

    @property
    def saliency_array(self) -> zarr.Array:
        """Lazy float32 (T, d, h, w) ``saliency/tokens`` array, read only where it is indexed."""
        return self._array("saliency/tokens")

    def saliency(self) -> np.ndarray:
        """Read all token maps: float32 (T, d, h, w) on the model's native grid."""
        return np.asarray(self.saliency_array[...])

    @property
    def has_entities(self) -> bool:
        """True when the ``.explained`` marker and the ``entities/heatmaps`` array both exist."""
        return self._marker_exists("explained") and isinstance(self._group.get("entities/heatmaps"), zarr.Array)

    def _entity_group(self) -> zarr.Group:
        if not self.has_entities:
            message = (
                f"study store '{self.path}' has no entities yet: marker '{self.study_id}.explained' "
                "or node 'entities/heatmaps' is missing, so run the NER step first"
            )
            raise StoreNotReadyError(message)
        return self._subgroup("entities")

    @property
    def entities(self) -> list[dict[str, Any]]:
        """Entity dicts (text, label, start, end, assertion, token indices) from the NER step."""
        entities = self._entity_group().attrs.get("entities")
        if not isinstance(entities, list):
            raise _corrupt(self.path, "group 'entities' has no 'entities' list attribute")
        return [dict(entity) for entity in entities if isinstance(entity, dict)]

    @property
    def entity_heatmaps(self) -> np.ndarray:
        """float32 (E, Z', Y', X') heatmaps, one per entity, usually on the CT grid."""
        self._entity_group()
        return np.asarray(self._array("entities/heatmaps")[...])

    @property
    def entity_attrs(self) -> dict[str, Any]:
        """Attributes of the ``entities`` group other than the entity list: backend, backend_version, extras."""
        attrs = dict(self._entity_group().attrs)
        attrs.pop("entities", None)
        return attrs

    def validate(self) -> None:
        """Check every node's dtype and shape and every saliency value.

        Reads saliency one token map at a time. Raises StoreCorruptError naming the
        first node that fails one of these checks:

        - ``ct`` is int16 (Z, Y, X).
        - every mask is uint8 on the CT grid.
        - ``saliency/tokens`` is float32 (T, d, h, w) with T == len(tokens), and every
          value is finite and non-negative.
        - ``entities/heatmaps``, when present, is float32 (E, Z', Y', X') with
          E == len(entities), and every value is finite.
        """
        _check_layout(self.path, self.study_id, self._group)
        if self.attrs.get("axes") != "zyx":
            raise _corrupt(self.path, f"group attribute axes is {self.attrs.get('axes')!r}, expected 'zyx'")

        ct = self._array("ct")
        if ct.dtype != np.int16 or ct.ndim != 3:
            raise _corrupt(self.path, f"array 'ct' is {ct.dtype} {ct.shape}, expected int16 (Z, Y, X)")
        for name in self.mask_names:
            mask = self._array(f"masks/{name}")
            if mask.dtype != np.uint8 or mask.shape != ct.shape:
                raise _corrupt(
                    self.path, f"array 'masks/{name}' is {mask.dtype} {mask.shape}, expected uint8 {ct.shape}"
                )

        self._validate_saliency()
        entities = self._group.get("entities")
        if isinstance(entities, zarr.Group):
            self._validate_entities(entities)

    def _validate_saliency(self) -> None:
        saliency = self.saliency_array
        if saliency.dtype != np.float32 or saliency.ndim != 4:
            raise _corrupt(
                self.path,
                f"array 'saliency/tokens' is {saliency.dtype} {saliency.shape}, expected float32 (T, d, h, w)",
            )
        if saliency.shape[0] != len(self.tokens):
            message = (
                f"array 'saliency/tokens' has {saliency.shape[0]} token maps "
                f"but the tokens attribute lists {len(self.tokens)} tokens"
            )
            raise _corrupt(self.path, message)
        for index in range(saliency.shape[0]):
            token_map = np.asarray(saliency[index])
            if not np.isfinite(token_map).all():
                raise _corrupt(
                    self.path, f"array 'saliency/tokens' contains NaN or infinite values in token map {index}"
                )
            if token_map.size and float(token_map.min()) < 0:
                raise _corrupt(self.path, f"array 'saliency/tokens' contains negative values in token map {index}")

    def _validate_entities(self, group: zarr.Group) -> None:
        heatmaps = group.get("heatmaps")
        if not isinstance(heatmaps, zarr.Array):
            raise _corrupt(self.path, "array 'entities/heatmaps' is missing")
        entities = group.attrs.get("entities")
        if not isinstance(entities, list):
            raise _corrupt(self.path, "group 'entities' has no 'entities' list attribute")
        if heatmaps.dtype != np.float32 or heatmaps.ndim != 4:
            raise _corrupt(
                self.path,
                f"array 'entities/heatmaps' is {heatmaps.dtype} {heatmaps.shape}, expected float32 (E, Z, Y, X)",
            )
        if heatmaps.shape[0] != len(entities):
            message = (
                f"array 'entities/heatmaps' has {heatmaps.shape[0]} heatmaps "
                f"but the entities attribute lists {len(entities)}"
            )
            raise _corrupt(self.path, message)
        for index in range(heatmaps.shape[0]):
            if not np.isfinite(np.asarray(heatmaps[index])).all():
                raise _corrupt(
                    self.path, f"array 'entities/heatmaps' contains NaN or infinite values in heatmap {index}"
                )

    def _hidden_token_texts(self) -> list[str] | None:
        """Return the prompt text under each run of consecutive ``hidden_tokens`` positions, or None without them.

        A run of word pieces such as "pl ##eur ##al e ##ff ##usion" reads back
        as the prompt's "pleural effusion".
        """
        hidden = self.attrs.get("hidden_tokens")
        if not isinstance(hidden, list):
            return None
        tokens = self.tokens
        positions = sorted(index for index in hidden if isinstance(index, int) and 0 <= index < len(tokens))
        runs: list[list[int]] = []
        for index in positions:
            if runs and index == runs[-1][-1] + 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        return [self.prompt[int(tokens[run[0]]["start"]) : int(tokens[run[-1]]["end"])] for run in runs]

    def summary(self) -> dict[str, Any]:
        """Describe the study as a JSON-ready dict, reading saliency one token map at a time.

        Keys: study_id, prompt, path, spacing_mm, arrays (node -> {shape, dtype}),
        n_tokens, n_special, truncated (the prompt needed more than n_tokens
        positions, None when the store does not say), prompt_tokens (positions
        the whole prompt needs), hidden_tokens (the prompt text under each run
        of token positions hidden from the model as negated, None when the
        store does not say),
        provenance (model_name, checkpoint_sha256, seed, sampler,
        text_encoder, software_version, created_at), saliency_sum (min and max over
        voxels of the sum over all T token maps, 1.0 for a complete capture),
        markers, and n_entities when entities are present.
        """
        arrays: dict[str, dict[str, Any]] = {}
        nodes = ["ct", *(f"masks/{name}" for name in self.mask_names), "saliency/tokens"]
        if self.has_entities:
            nodes.append("entities/heatmaps")
        for node in nodes:
            array = self._array(node)
            arrays[node] = {"shape": list(array.shape), "dtype": str(array.dtype)}

        saliency = self.saliency_array
        total = np.zeros(saliency.shape[1:], dtype=np.float64)
        for index in range(saliency.shape[0]):
            total += np.asarray(saliency[index], dtype=np.float64)

        model = self.attrs.get("model") or {}
        summary: dict[str, Any] = {
            "study_id": self.study_id,
            "prompt": self.prompt,
            "path": str(self.path),
            "spacing_mm": list(self.spacing_mm),
            "arrays": arrays,
            "n_tokens": len(self.tokens),
            "n_special": sum(1 for token in self.tokens if token.get("special")),
            "truncated": self.attrs.get("truncated"),
            "prompt_tokens": self.attrs.get("prompt_tokens"),
            "hidden_tokens": self._hidden_token_texts(),
            "provenance": {
                "model_name": model.get("name") if isinstance(model, dict) else None,
                "checkpoint_sha256": model.get("checkpoint_sha256") if isinstance(model, dict) else None,
                "seed": self.attrs.get("seed"),
                "sampler": self.attrs.get("sampler"),
                "text_encoder": self.attrs.get("text_encoder"),
                "software_version": self.attrs.get("software_version"),
                "created_at": self.attrs.get("created_at"),
            },
            "saliency_sum": {
                "min": float(total.min()) if total.size else None,
                "max": float(total.max()) if total.size else None,
            },
            "markers": self.markers,
        }
        if self.has_entities:
            summary["n_entities"] = len(self.entities)
        return summary


def write_entities(
    path: Path | str | StudyStore,
    entities: list[dict[str, Any]],
    heatmaps: np.ndarray,
    *,
    backend: str,
    backend_version: str,
    extra_attrs: dict[str, Any] | None = None,
) -> None:
    """Write the ``entities`` group of a sampled study, then its ``.explained`` marker.

    An existing ``.explained`` marker is removed first and an existing ``entities``
    group is replaced, so running the NER step again is safe.

    Args:
        path: the study's ``.zarr`` folder, whose ``.sampled`` marker must exist, or
            a store already opened with ``require="sampled"``.
        entities: one JSON-compatible dict per entity (text, label, start, end,
            assertion, token indices).
        heatmaps: float32 (E, Z, Y, X) finite heatmaps with E == len(entities),
            usually on the CT grid. E may be 0. Stored with chunks (1, Z, Y, X).
        backend: name of the NER backend that found the entities.
        backend_version: version string of that backend.
        extra_attrs: more attributes for the ``entities`` group. Default: None.

    Raises:
        StoreNotReadyError: the study or its ``.sampled`` marker is missing.
        ValueError: heatmaps have the wrong dtype, shape or non-finite values.
    """
    store = path if isinstance(path, StudyStore) else StudyStore.open(path, require="sampled")
    for index, entity in enumerate(entities):
        if not isinstance(entity, Mapping):
            raise ValueError(f"invalid entity {index} of type {type(entity).__name__}: pass one dict per entity")
    _check_array("heatmaps", heatmaps, np.float32, ndim=4)
    if heatmaps.shape[0] != len(entities):
        message = (
            f"invalid array 'heatmaps' of shape {heatmaps.shape}: "
            f"its first axis must equal the number of entities ({len(entities)})"
        )
        raise ValueError(message)
    if any(size == 0 for size in heatmaps.shape[1:]):
        raise ValueError(
            f"invalid array 'heatmaps' of shape {heatmaps.shape}: every spatial axis needs at least one voxel"
        )
    if not np.isfinite(heatmaps).all():
        raise ValueError(
            "invalid array 'heatmaps': it contains NaN or infinite values, so check the entity aggregation"
        )
    extra = dict(extra_attrs or {})
    clashes = [key for key in _ENTITY_GROUP_KEYS if key in extra]
    if clashes:
        raise ValueError(f"invalid extra_attrs keys {clashes}: write_entities sets them from its own arguments")
    attrs = _to_json(
        {**extra, "entities": entities, "backend": backend, "backend_version": backend_version}, "entities"
    )

    explained = store.path.with_name(f"{store.study_id}.explained")
    explained.unlink(missing_ok=True)
    group = zarr.open_group(store.path, mode="r+", zarr_format=3)
    if "entities" in group:
        del group["entities"]
    entity_group = group.create_group("entities", attributes=attrs)
    # Uncompressed: float attention maps compress poorly, and the codec more than
    # doubled the write time of ten 64^3 heatmaps (zarr 3.1, 2-core CPU). Writing
    # the chunk files directly (chunk_io) took 5 ms there, against 15 ms through Zarr.
    array = entity_group.create_array(
        "heatmaps", shape=heatmaps.shape, dtype=np.float32, chunks=(1, *heatmaps.shape[1:]), compressors=None
    )
    write_rows(array, heatmaps)

    payload = {
        "study_id": store.study_id,
        "created_at": _utc_now(),
        "software_version": __version__,
        "backend": backend,
        "backend_version": backend_version,
        "n_entities": len(entities),
    }
    _write_json_atomic(explained, payload)
    log.info(
        "entities_written", study_id=store.study_id, path=str(store.path), n_entities=len(entities), backend=backend
    )


def write_failed_marker(root: Path | str, study_id: str, *, stage: str, error: str, detail: str) -> Path:
    """Write ``<root>/studies/<study_id>.failed`` as JSON {stage, error, detail, study_id, created_at}.

    Args:
        root: data root of the deployment. ``studies/`` is created when missing.
        study_id: id of the study that failed.
        stage: pipeline step that failed, for example "sample" or "explain".
        error: exception class name or a short error code.
        detail: one-line error message.

    Returns:
        Path of the marker.
    """
    path = marker_path(root, study_id, "failed")
    _make_studies_dir(Path(root))
    payload = {"study_id": study_id, "stage": stage, "error": error, "detail": detail, "created_at": _utc_now()}
    _write_json_atomic(path, payload)
    log.info("failed_marker_written", study_id=study_id, path=str(path), stage=stage, error=error)
    return path


def list_studies(root: Path | str) -> dict[str, set[str]]:
    """Map each study id under ``<root>/studies`` to the parts present.

    Parts are "zarr" (the folder exists) and the marker kinds "sampled", "explained"
    and "failed". Hidden entries (temporary folders and files) and names that are not
    valid study ids are skipped. Returns an empty dict when ``studies/`` is missing.
    """
    folder = studies_dir(root)
    if not folder.is_dir():
        return {}
    studies: dict[str, set[str]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        stem, dot, suffix = entry.name.rpartition(".")
        if not dot or STUDY_ID_PATTERN.fullmatch(stem) is None:
            continue
        if suffix == "zarr" and entry.is_dir():
            studies.setdefault(stem, set()).add("zarr")
        elif suffix in MARKER_KINDS and entry.is_file():
            studies.setdefault(stem, set()).add(suffix)
    return studies


def nifti_affine(spacing_mm: Sequence[float], shape_zyx: Sequence[int]) -> np.ndarray:
    """Build the RAS+ affine of a (Z, Y, X) volume stored in NIfTI as (x, y, z).

    Voxel axes point L, P, S, so the affine is ``diag(-sx, -sy, sz, 1)`` with
    ``(sz, sy, sx) = spacing_mm``. The translation puts the centre of the volume,
    voxel ((X-1)/2, (Y-1)/2, (Z-1)/2) in NIfTI order, at world (0, 0, 0) mm.

    Args:
        spacing_mm: voxel size (z, y, x) in millimetres.
        shape_zyx: array shape (Z, Y, X).

    Returns:
        float64 (4, 4) voxel-to-world matrix in mm.
    """
    _check_spacing(spacing_mm)
    if len(shape_zyx) != 3 or any(int(count) < 1 for count in shape_zyx):
        raise ValueError(f"invalid shape_zyx {tuple(shape_zyx)!r}: pass three positive voxel counts (Z, Y, X)")
    size_z, size_y, size_x = (float(value) for value in spacing_mm)
    count_z, count_y, count_x = (int(value) for value in shape_zyx)
    affine = np.diag([-size_x, -size_y, size_z, 1.0])
    centre_voxel = np.array([(count_x - 1) / 2, (count_y - 1) / 2, (count_z - 1) / 2])
    affine[:3, 3] = -affine[:3, :3] @ centre_voxel
    return affine


def export_nifti(store: StudyStore, out_dir: Path | str, *, heatmaps: bool = True) -> list[Path]:
    """Write the study's CT, masks and entity heatmaps as NIfTI-1 files in ``out_dir``.

    Files: ``ct.nii.gz`` (int16, HU), ``mask_<name>.nii.gz`` (uint8) and, when
    ``heatmaps`` is True and entities exist, ``entity_<index:02d>_<text>.nii.gz``
    (float32), where <text> is the entity text in lowercase with every run of other
    characters than a-z and 0-9 replaced by "_", at most 40 characters. Token saliency
    maps are not exported. Data is stored in (x, y, z) order with the affine of
    :func:`nifti_affine`. A heatmap whose grid differs from the CT grid gets a voxel
    size scaled by CT shape / heatmap shape, so it covers the same field of view.

    Args:
        store: an open study.
        out_dir: output folder, created when missing.
        heatmaps: also export entity heatmaps. Default: True.

    Returns:
        Paths of the written files, CT first.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ct = store.ct
    affine = nifti_affine(store.spacing_mm, ct.shape)

    written = [_save_nifti(ct, affine, out_dir / "ct.nii.gz")]
    for name, mask in store.masks.items():
        written.append(_save_nifti(mask, affine, out_dir / f"mask_{name}.nii.gz"))

    if heatmaps and store.has_entities:
        maps = store.entity_heatmaps
        grid_spacing = tuple(
            spacing * ct_count / map_count
            for spacing, ct_count, map_count in zip(store.spacing_mm, ct.shape, maps.shape[1:], strict=True)
        )
        map_affine = nifti_affine(grid_spacing, maps.shape[1:])
        for index, entity in enumerate(store.entities):
            stem = f"entity_{index:02d}"
            text = _safe_file_text(str(entity.get("text", "")))
            name = f"{stem}_{text}.nii.gz" if text else f"{stem}.nii.gz"
            written.append(_save_nifti(maps[index], map_affine, out_dir / name))

    log.info("nifti_exported", study_id=store.study_id, path=str(out_dir), n_files=len(written))
    return written


def _safe_file_text(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40].rstrip("_")


def _save_nifti(volume_zyx: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    volume_xyz = np.ascontiguousarray(volume_zyx.transpose(2, 1, 0))  # (Z, Y, X) -> (X, Y, Z)
    image = nib.Nifti1Image(volume_xyz, affine)
    image.set_data_dtype(volume_xyz.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    nib.save(image, path)
    return path
