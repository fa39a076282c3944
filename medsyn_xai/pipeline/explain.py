"""The explain job: one entity heatmap per clinical entity of a sampled study.

Notation:

    T          token positions of the encoder, padding included
    E          entities found in the prompt
    (d, h, w)  native grid of the token maps in ``saliency/tokens``
    (Z, Y, X)  output grid of the heatmaps, the CT grid by default

Steps of :meth:`StudyExplainer.explain`:

1. Open the store, which needs its ``.sampled`` marker, and read the token maps
   (T, d, h, w). Reject a store whose token list and maps disagree in length or
   whose maps hold NaN, infinite or negative values.
2. Take the prompt's entities from the group attribute ``ner`` when the sampler
   stored them with the same backend name and version, else run the backend.
3. Align the entities with the store's token records by character offsets.
4. Average each entity's token maps into (E, d, h, w) and resize all E maps to
   (Z, Y, X) in one batched trilinear call. An entity without tokens, for
   example one past a truncated prompt, keeps an all-zero heatmap.
5. Write the ``entities`` group, then the ``.explained`` marker.

Running the job again on the same store replaces the ``entities`` group with
an identical one.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from medsyn_xai.align import align_entities
from medsyn_xai.chunk_io import ChunkFileError, read_rows
from medsyn_xai.config import NerSettings
from medsyn_xai.ner.backends import NERBackend, get_backend
from medsyn_xai.ner.entity import Entity
from medsyn_xai.saliency.resize import resize_maps
from medsyn_xai.store import (
    StoreCorruptError,
    StudyStore,
    write_entities,
    write_failed_marker,
)
from medsyn_xai.text.tokens import TokenRecord

__all__ = [
    "AGGREGATION",
    "ExplainResult",
    "MAX_GRID_VOXELS",
    "StudyExplainer",
    "build_ner_backend",
    "check_grid",
    "entity_file_stems",
    "entity_heatmaps",
    "explain_study",
    "export_entity_npy",
    "write_explain_failure",
]

log = structlog.get_logger(__name__)

AGGREGATION = "mean of the entity's token maps, then trilinear resize (align_corners=False)"

# Largest output grid the explain job accepts: one float32 heatmap of 512^3 is 512 MiB.
# NOTE: the limit is per heatmap, so many entities on a grid near it can still run out of memory.
MAX_GRID_VOXELS = 512**3
"""Description of the heatmap computation, stored as the ``aggregation`` attribute of the ``entities`` group."""


def check_grid(grid: Sequence[int]) -> tuple[int, int, int]:
    """Check that ``grid`` is three positive voxel counts and return it as ints (Z, Y, X).

    Raises:
        ValueError: not three values, a value that is not a positive integer, or
            a grid of more than ``MAX_GRID_VOXELS`` voxels.
    """
    values = list(grid) if isinstance(grid, (tuple, list)) else []
    valid = len(values) == 3 and all(
        isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0 for value in values
    )
    if not valid:
        raise ValueError(f"invalid grid {grid!r}: pass three positive voxel counts (Z, Y, X), for example 64 64 64")
    size_z, size_y, size_x = (int(value) for value in values)
    if size_z * size_y * size_x > MAX_GRID_VOXELS:
        message = (
            f"invalid grid {grid!r}: {size_z * size_y * size_x} voxels is more than {MAX_GRID_VOXELS} (512^3), "
            "so pass a smaller grid"
        )
        raise ValueError(message)
    return size_z, size_y, size_x


def build_ner_backend(settings: NerSettings) -> NERBackend:
    """Build the NER backend that ``settings`` selects; the transformer model loads here.

    Raises:
        ValueError: an unknown backend name, or the transformer backend without
            ``model_folder``, or a folder transformers cannot load.
        FileNotFoundError: ``model_folder`` or its config.json does not exist.
    """
    if settings.backend == "transformer":
        if not settings.model_folder:
            message = (
                "ner.model_folder is empty: the transformer backend needs a token-classification "
                "folder, so pass --model-folder DIR or set ner.model_folder"
            )
            raise ValueError(message)
        folder = Path(settings.model_folder).expanduser()
        if not folder.is_dir():
            message = (
                f"NER model folder '{folder}' not found: pass --model-folder DIR or set ner.model_folder "
                "to a token-classification folder written by save_pretrained"
            )
            raise FileNotFoundError(message)
        return get_backend("transformer", model_dir=folder, label_map=settings.label_map)
    return get_backend(settings.backend)


@dataclass(frozen=True)
class ExplainResult:
    """Entities and heatmaps that :meth:`StudyExplainer.explain` wrote for one study.

    Attributes:
        path: the study's ``.zarr`` folder.
        study_id: the study id.
        entities: aligned entities in order of their start offset, absent and
            uncertain ones included.
        heatmaps: float32 (E, Z, Y, X) heatmaps, row e for ``entities[e]``, in the
            units of the token maps (mean attention probability per voxel).
        backend: name of the NER backend.
        backend_version: version string of that backend.
        ner_from_cache: True when the entities came from the store's ``ner``
            attribute instead of a new backend run.
    """

    path: Path
    study_id: str
    entities: tuple[Entity, ...]
    heatmaps: np.ndarray
    backend: str
    backend_version: str
    ner_from_cache: bool

    @property
    def grid(self) -> tuple[int, int, int]:
        """Output grid (Z, Y, X) of the heatmaps in voxels."""
        size_z, size_y, size_x = self.heatmaps.shape[1:]
        return int(size_z), int(size_y), int(size_x)

    @property
    def n_uncovered(self) -> int:
        """Number of entities no token covers; their heatmaps are all zero."""
        return sum(1 for entity in self.entities if not entity.covered)


class StudyExplainer:
    """Holds one NER backend and writes entity heatmaps into sampled studies.

    Build it once per process (the CLI or a daemon) and call :meth:`explain` per
    study, so a backend model loads once.

    Args:
        backend: the entity extractor, for example ``get_backend("rules")``.
    """

    def __init__(self, backend: NERBackend) -> None:
        self.backend = backend

    @classmethod
    def from_settings(cls, settings: NerSettings) -> StudyExplainer:
        """Build the backend ``settings`` selects (see :func:`build_ner_backend`) and wrap it."""
        return cls(build_ner_backend(settings))

    def explain(self, path: Path | str, *, grid: Sequence[int] | None = None, reuse_ner: bool = True) -> ExplainResult:
        """Compute and store the entity heatmaps of the study at ``path``.

        Args:
            path: the study's ``.zarr`` folder; its ``.sampled`` marker must exist.
            grid: output grid (Z, Y, X) in voxels; None uses the CT shape. Default: None.
            reuse_ner: take the entities from the store's ``ner`` attribute when
                its backend name and version match this backend. Default: True.

        Returns:
            The entities and float32 (E, Z, Y, X) heatmaps that were written.

        Raises:
            StoreNotReadyError: the store or its ``.sampled`` marker is missing.
            StoreCorruptError: the token list and token maps differ in length, or
                a token map that an entity uses contains NaN, infinite or negative
                values. Maps of tokens outside every entity are not read.
            ValueError: an invalid ``grid``.
        """
        started = time.perf_counter()
        output_grid = None if grid is None else check_grid(grid)

        # 1. Open the store and check the token maps' shape against the token list.
        store = StudyStore.open(path, require="sampled")
        bound = log.bind(study_id=store.study_id, path=str(store.path))
        tokens = [TokenRecord.from_dict(token) for token in store.tokens]
        _check_token_map_shape(store, len(tokens))
        if output_grid is None:
            output_grid = check_grid(store.ct_shape)

        # 2. Entities of the prompt, from the sampler's cache when it matches this backend.
        entities = _cached_entities(store, self.backend) if reuse_ner else None
        ner_from_cache = entities is not None
        if entities is None:
            entities = self.backend.extract(store.prompt)

        # 3. Token indices by character offsets.
        aligned = align_entities(entities, tokens)

        # 4. Read only the token maps that entities use, average per entity, resize in one call.
        used = sorted({index for entity in aligned for index in entity.token_indices})
        token_maps = _read_token_maps(store, used)  # (K, d, h, w), row k is token used[k]
        heatmaps = entity_heatmaps(aligned, token_maps, output_grid, token_indices=used)

        # 5. Publish: write_entities writes the .explained marker last.
        write_entities(
            store,
            [entity.to_dict() for entity in aligned],
            heatmaps,
            backend=self.backend.name,
            backend_version=self.backend.version,
            extra_attrs={"aggregation": AGGREGATION, "grid": list(output_grid)},
        )
        n_uncovered = sum(1 for entity in aligned if not entity.covered)
        bound.info(
            "study_explained",
            n_entities=len(aligned),
            n_uncovered=n_uncovered,
            ner_from_cache=ner_from_cache,
            grid=list(output_grid),
            elapsed_ms=round(1000 * (time.perf_counter() - started), 1),
        )
        return ExplainResult(
            path=store.path,
            study_id=store.study_id,
            entities=tuple(aligned),
            heatmaps=heatmaps,
            backend=self.backend.name,
            backend_version=self.backend.version,
            ner_from_cache=ner_from_cache,
        )


def explain_study(
    store_path: Path | str, *, backend: NERBackend, grid: Sequence[int] | None = None
) -> ExplainResult:
    """Run :meth:`StudyExplainer.explain` once with ``backend``; build a StudyExplainer to explain many studies."""
    return StudyExplainer(backend).explain(store_path, grid=grid)


def entity_heatmaps(
    entities: Sequence[Entity],
    token_maps: np.ndarray,
    grid: tuple[int, int, int],
    *,
    token_indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Average each entity's token maps and resize all of them to ``grid`` in one call.

    Args:
        entities: aligned entities with ``token_indices`` into the study's token list.
        token_maps: float32 (K, d, h, w) token maps on the native grid.
        grid: output (Z, Y, X) in voxels.
        token_indices: the token index of each row of ``token_maps``, so that
            ``token_maps`` may contain only the tokens that entities use. None
            means row t is token t.

    Returns:
        float32 (E, Z, Y, X) heatmaps. An entity without token indices gets zeros.
    """
    if token_indices is None:
        token_indices = range(token_maps.shape[0])
    row_of = {int(token): row for row, token in enumerate(token_indices)}
    weights = np.zeros((len(entities), token_maps.shape[0]), dtype=np.float32)  # (E, K)
    for row, entity in enumerate(entities):
        if entity.token_indices:
            columns = [row_of[index] for index in entity.token_indices]
            weights[row, columns] = 1.0 / len(columns)
    native = torch.einsum("et,tdhw->edhw", torch.from_numpy(weights), torch.from_numpy(token_maps))
    return resize_maps(native, grid).numpy()


def write_explain_failure(path: Path | str, error: BaseException) -> Path:
    """Write ``<id>.failed`` with stage "explain" next to the store at ``path`` and return the marker path.

    The marker contains the error's class name and its message's first line. The
    explain job never calls this itself: its caller decides whether a failure is
    final for the study.
    """
    path = Path(path)
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    root, study_id = path.parent.parent, path.stem
    return write_failed_marker(root, study_id, stage="explain", error=type(error).__name__, detail=detail)


def entity_file_stems(texts: Sequence[str]) -> list[str]:
    """Turn entity texts into distinct file-name stems.

    A stem is the text in lowercase with every run of characters other than a-z
    and 0-9 replaced by "_", at most 40 characters, or "entity" when nothing is
    left. When two entities share a stem, each of them gets its position in
    ``texts`` as a suffix ("nodule_2", "nodule_5"), so every stem names one entity.
    """
    stems = [_safe_stem(text) for text in texts]
    counts = Counter(stems)
    return [f"{stem}_{index}" if counts[stem] > 1 else stem for index, stem in enumerate(stems)]


def export_entity_npy(store: StudyStore, out_dir: Path | str) -> list[Path]:
    """Write each entity heatmap as ``<stem>_heatmap.npy``, the layout of the original Medsyn_XAI scripts.

    Each file contains one float32 (Z, Y, X) array, (64, 64, 64) on the default grid,
    in the store's "zyx" axis order. Stems come from :func:`entity_file_stems`.

    Args:
        store: an open study with entities (its ``.explained`` marker exists).
        out_dir: output folder, created when missing.

    Returns:
        Paths of the written files in entity order.

    Raises:
        StoreNotReadyError: the study has no entities yet.
    """
    heatmaps = store.entity_heatmaps  # (E, Z, Y, X)
    stems = entity_file_stems([str(entity.get("text", "")) for entity in store.entities])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    written = []
    for stem, heatmap in zip(stems, heatmaps, strict=True):
        target = out_dir / f"{stem}_heatmap.npy"
        np.save(target, np.ascontiguousarray(heatmap, dtype=np.float32))
        written.append(target)
    log.info("npy_exported", study_id=store.study_id, path=str(out_dir), n_files=len(written))
    return written


def _safe_stem(text: str) -> str:
    stem = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40].rstrip("_")
    return stem or "entity"


def _check_token_map_shape(store: StudyStore, n_tokens: int) -> None:
    """Reject token maps whose first axis differs from the token list, reading only the array metadata."""
    shape = store.saliency_array.shape
    if len(shape) != 4 or shape[0] != n_tokens:
        raise _corrupt(
            store,
            f"array 'saliency/tokens' has shape {shape} but the tokens attribute lists "
            f"{n_tokens} tokens, so the first axis must be {n_tokens}",
        )


def _read_token_maps(store: StudyStore, indices: Sequence[int]) -> np.ndarray:
    """Read float32 (K, d, h, w) token maps of the tokens ``indices`` and reject NaN, infinite or negative values.

    Only the chunks of those tokens are read, usually a small part of the
    study's token maps because most tokens belong to no entity.
    """
    array = store.saliency_array
    if not indices:
        return np.zeros((0, *array.shape[1:]), dtype=np.float32)
    try:
        token_maps = read_rows(array, indices)
    except ChunkFileError as error:
        raise _corrupt(store, str(error)) from None
    flat = token_maps.reshape(token_maps.shape[0], -1)  # (K, d*h*w)
    not_finite = np.flatnonzero(~np.isfinite(flat).all(axis=1))
    if not_finite.size:
        token = indices[int(not_finite[0])]
        raise _corrupt(store, f"token map {token} contains NaN or infinite values")
    negative = np.flatnonzero((flat < 0).any(axis=1))
    if negative.size:
        token = indices[int(negative[0])]
        raise _corrupt(store, f"token map {token} contains negative values")
    return token_maps.astype(np.float32, copy=False)


def _corrupt(store: StudyStore, detail: str) -> StoreCorruptError:
    return StoreCorruptError(f"study store '{store.path}' is corrupt: {detail}: write the study again with --overwrite")


def _cached_entities(store: StudyStore, backend: NERBackend) -> list[Entity] | None:
    """Return the entities the sampler stored under the ``ner`` attribute, or None when they cannot be used.

    The cache is used only when its backend name and version equal ``backend``'s
    and every entity's offsets select its text in the prompt. A cache that fails
    the second check is logged and ignored, so the backend runs instead.
    """
    cached: Any = store.attrs.get("ner")
    if not isinstance(cached, dict):
        return None
    if cached.get("backend") != backend.name or cached.get("version") != backend.version:
        log.debug(
            "ner_cache_stale",
            study_id=store.study_id,
            cached_backend=cached.get("backend"),
            cached_version=cached.get("version"),
            backend=backend.name,
            version=backend.version,
        )
        return None

    prompt = store.prompt
    try:
        entities = [Entity.from_dict(item) for item in cached["entities"]]
    except (KeyError, TypeError, ValueError) as error:
        log.warning("ner_cache_invalid", study_id=store.study_id, path=str(store.path), error=str(error))
        return None
    for entity in entities:
        if entity.end > len(prompt) or prompt[entity.start : entity.end] != entity.text:
            log.warning(
                "ner_cache_invalid",
                study_id=store.study_id,
                path=str(store.path),
                error=f"entity {entity.text!r} at [{entity.start}, {entity.end}) does not match the prompt",
            )
            return None
    return [dataclasses.replace(entity, backend=backend.name, backend_version=backend.version) for entity in entities]
