"""Training data: synthetic phantoms or a folder of NIfTI CTs with report text.

Both datasets yield dicts with

* ``image``: float32 (C, D, H, W) in [-1, 1] on the model's native grid, channel 0
  the CT (HU clipped to [-1024, 600] and scaled), then the mask channels in the
  order of ``channel_names``;
* ``text``: float32 (T, D) text embeddings of the report, cached per report;
* ``report``: the report text; ``study_id``: a string id;
* ``findings``: for phantoms, one dict per drawn finding with ``spans`` (character
  ``(start, end)`` of its mentions in the report) and ``region``, a bool (D, H, W)
  tensor on the native grid, max-pooled from the finding's mask. Empty for NIfTI
  folders, whose masks are not split by finding.

Array axes follow the package convention (z, y, x): x from the patient's right to
left, y from anterior to posterior, z from inferior to superior.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from monai.data import Dataset

from medsyn_xai.model.volume import LABEL_COUNTS, encode_volume
from medsyn_xai.phantom import generate_phantom, random_spec, write_report

__all__ = [
    "DataError",
    "NiftiFolderDataset",
    "PhantomDataset",
    "TextEmbeddingCache",
    "downsample_case",
    "phantom_case",
]

log = structlog.get_logger(__name__)


class DataError(ValueError):
    """A training data row or file is missing or unreadable."""


class TextEmbeddingCache:
    """Report text -> (T, D) embeddings, computed once per distinct report.

    Args:
        encode: function from text to a (1, T, D) float tensor.
        key: a string that identifies the encoder (folder, layer, max_tokens), so
            a cache is never reused across encoders.
        dtype: storage dtype; float16 halves the memory of large report sets.
    """

    def __init__(
        self,
        encode: Callable[[str], torch.Tensor],
        *,
        key: str,
        dtype: torch.dtype = torch.float16,
        encode_batch: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> None:
        self._encode = encode
        self._encode_batch = encode_batch
        self._key = key
        self._dtype = dtype
        self._cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def _digest(self, text: str) -> str:
        return hashlib.sha256(f"{self._key}\0{text}".encode()).hexdigest()

    def prefetch(self, texts: Sequence[str]) -> None:
        """Encode every text not cached yet, in batches when a batch encoder is set."""
        missing = list(dict.fromkeys(text for text in texts if self._digest(text) not in self._cache))
        if not missing:
            return
        if self._encode_batch is None:
            for text in missing:
                self.get(text)
            return
        for text, embeddings in zip(missing, self._encode_batch(missing)):
            self._cache[self._digest(text)] = embeddings.to(self._dtype)

    def get(self, text: str) -> torch.Tensor:
        """Return float32 (T, D) embeddings of ``text``, encoding it on first use."""
        digest = self._digest(text)
        if digest not in self._cache:
            self._cache[digest] = self._encode(text)[0].to(self._dtype)
        return self._cache[digest].to(torch.float32)


def downsample_case(
    channels: np.ndarray,
    channel_names: Sequence[str],
    shape: tuple[int, int, int],
) -> np.ndarray:
    """Resize model channels (C, Z, Y, X) in [-1, 1] to ``shape``.

    The CT is area-averaged (trilinear when upsampling), label maps take the
    nearest label, and binary masks use max pooling so that a lesion smaller than
    one output voxel still marks that voxel.
    """
    tensor = torch.from_numpy(channels)[None]  # (1, C, Z, Y, X)
    if tuple(tensor.shape[2:]) == tuple(shape):
        return channels.astype(np.float32)

    out = []
    for index, name in enumerate(channel_names):
        channel = tensor[:, index : index + 1]
        shrinking = all(source >= target for source, target in zip(channel.shape[2:], shape))
        if index == 0:
            mode = "area" if shrinking else "trilinear"
            resized = F.interpolate(channel, size=shape, mode=mode, **({} if shrinking else {"align_corners": False}))
        elif LABEL_COUNTS.get(name, 1) > 1:
            resized = F.interpolate(channel, size=shape, mode="nearest")
        elif shrinking:
            resized = F.adaptive_max_pool3d(channel, shape)
        else:
            resized = F.interpolate(channel, size=shape, mode="nearest")
        out.append(resized[0, 0])
    return torch.stack(out).numpy().astype(np.float32)


def phantom_case(
    seed: int,
    *,
    channel_names: Sequence[str],
    native_shape: tuple[int, int, int],
    phantom_shape: tuple[int, int, int] = (32, 32, 32),
    spec_options: dict | None = None,
) -> dict:
    """Generate one phantom case: channels on the native grid and its report.

    Args:
        seed: seed of the spec, the anatomy and the report wording.
        channel_names: model channels, CT first; masks come from the phantom.
        native_shape: (D, H, W) the model trains on.
        phantom_shape: grid the phantom is drawn on before downsampling.
        spec_options: keyword arguments for :func:`medsyn_xai.phantom.random_spec`.

    Returns:
        dict with ``image`` float32 (C, D, H, W), ``report`` str, ``study_id`` str,
        ``spec`` (the phantom spec as a dict), ``lesion_fraction`` float and
        ``findings`` (see the module docstring, regions as bool numpy arrays).
    """
    spec = random_spec(seed, **(spec_options or {}))
    phantom = generate_phantom(spec, shape=phantom_shape)
    report = write_report(spec, seed)
    channels = encode_volume(phantom.ct, phantom.masks, tuple(channel_names))
    image = downsample_case(channels, channel_names, native_shape)
    lesion_fraction = float((phantom.masks["lesion"] > 0).mean()) if "lesion" in phantom.masks else 0.0

    findings = []
    for index, mask in enumerate(phantom.finding_masks):
        spans = [(mention.start, mention.end) for mention in report.mentions_of(index)]
        if not spans or not mask.any():
            continue  # negated (not drawn) or never named in the report
        region = F.adaptive_max_pool3d(torch.from_numpy(mask).float()[None, None], native_shape)[0, 0] > 0
        findings.append({"spans": spans, "region": region.numpy()})
    return {
        "image": image,
        "report": report.text,
        "study_id": f"phantom-{seed}",
        "spec": spec.to_dict(),
        "lesion_fraction": lesion_fraction,
        "findings": findings,
    }


class PhantomDataset(Dataset):
    """Phantom cases for seeds ``seeds``, generated once and kept in memory.

    Args:
        seeds: one case per seed; training and evaluation use disjoint seeds.
        text_cache: embeddings per report.
        channel_names, native_shape, phantom_shape, spec_options: see
            :func:`phantom_case`.
        progress: called with 1 after each generated case.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        *,
        text_cache: TextEmbeddingCache,
        channel_names: Sequence[str],
        native_shape: tuple[int, int, int],
        phantom_shape: tuple[int, int, int] = (32, 32, 32),
        spec_options: dict | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        cases = []
        for seed in seeds:
            case = phantom_case(
                int(seed),
                channel_names=channel_names,
                native_shape=native_shape,
                phantom_shape=phantom_shape,
                spec_options=spec_options,
            )
            cases.append(case)
            if progress is not None:
                progress(1)
        text_cache.prefetch([case["report"] for case in cases])
        self.text_cache = text_cache
        super().__init__(cases, transform=self._attach_text)

    def _attach_text(self, case: dict) -> dict:
        return {
            "image": torch.from_numpy(case["image"]),
            "text": self.text_cache.get(case["report"]),
            "report": case["report"],
            "study_id": case["study_id"],
            "lesion_fraction": case["lesion_fraction"],
            "findings": [
                {"spans": finding["spans"], "region": torch.from_numpy(finding["region"])}
                for finding in case["findings"]
            ],
        }


@dataclass(frozen=True)
class _NiftiRow:
    row: int
    study_id: str
    report: str
    image: Path
    masks: dict[str, Path]


class NiftiFolderDataset(Dataset):
    """CT volumes in NIfTI files with a CSV of study id and report text.

    The folder contains ``reports.csv`` (columns ``study_id`` and ``report``, one
    row per study), ``<study_id>.nii.gz`` CTs in HU, and optional masks
    ``<study_id>_<mask name>.nii.gz`` for each mask channel. Each volume is
    reoriented to the package convention, its HU clipped to [-1024, 600] and
    scaled to [-1, 1], and resized to ``native_shape`` (masks by nearest
    neighbour). A mask channel without a file is filled with zeros (-1).

    Raises:
        DataError: the CSV is missing or malformed, or a CT named by a row is
            missing or unreadable; the message names the row and the path.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        text_cache: TextEmbeddingCache,
        channel_names: Sequence[str],
        native_shape: tuple[int, int, int],
        csv_name: str = "reports.csv",
    ) -> None:
        self.folder = Path(folder)
        self.channel_names = tuple(channel_names)
        self.native_shape = tuple(native_shape)
        self.text_cache = text_cache
        rows = self._read_rows(self.folder / csv_name)
        text_cache.prefetch([row.report for row in rows])
        super().__init__(rows)

    def _transform(self, index: int) -> dict:
        # Called by Dataset.__getitem__; loading directly keeps DataError unwrapped.
        return self._load(self.data[index])

    def _read_rows(self, csv_path: Path) -> list[_NiftiRow]:
        if not csv_path.is_file():
            raise DataError(f"report table '{csv_path}' not found: add a CSV with columns study_id and report")
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"study_id", "report"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"report table '{csv_path}' lacks column(s) {', '.join(sorted(missing))}")
            rows = []
            for number, record in enumerate(reader, start=2):
                study_id = (record["study_id"] or "").strip()
                report = (record["report"] or "").strip()
                if not study_id or not report:
                    raise DataError(f"row {number} of '{csv_path}' has an empty study_id or report: fill it or remove the row")
                image = self.folder / f"{study_id}.nii.gz"
                if not image.is_file():
                    raise DataError(f"row {number} of '{csv_path}': CT file '{image}' not found")
                masks = {
                    name: self.folder / f"{study_id}_{name}.nii.gz"
                    for name in self.channel_names[1:]
                    if (self.folder / f"{study_id}_{name}.nii.gz").is_file()
                }
                rows.append(_NiftiRow(number, study_id, report, image, masks))
        if not rows:
            raise DataError(f"report table '{csv_path}' has no rows")
        return rows

    def _load(self, row: _NiftiRow) -> dict:
        ct = self._read_volume(row, row.image)
        masks = {}
        for name in self.channel_names[1:]:
            if name in row.masks:
                masks[name] = np.rint(self._read_volume(row, row.masks[name])).astype(np.uint8)
                if masks[name].shape != ct.shape:
                    raise DataError(
                        f"row {row.row}: mask '{row.masks[name]}' has shape {masks[name].shape} "
                        f"but the CT has {ct.shape}: resample the mask to the CT grid"
                    )
            else:
                masks[name] = np.zeros(ct.shape, dtype=np.uint8)
        channels = encode_volume(ct, masks, self.channel_names)
        image = _resize_to(channels, self.channel_names, self.native_shape)
        return {
            "image": torch.from_numpy(image),
            "text": self.text_cache.get(row.report),
            "report": row.report,
            "study_id": row.study_id,
            "lesion_fraction": float((masks.get("lesion", np.zeros(1)) > 0).mean()),
            "findings": [],
        }

    @staticmethod
    def _read_volume(row: _NiftiRow, path: Path) -> np.ndarray:
        """Read a NIfTI file as float32 (z, y, x) in the package orientation."""
        from monai.transforms import LoadImage, Orientation

        try:
            image = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
        except Exception as error:  # noqa: BLE001 - MONAI wraps every reader failure in its own types
            raise DataError(f"row {row.row}: file '{path}' could not be read ({error})") from None
        # Axis codes name the direction each axis increases towards: patient Left,
        # Posterior, Superior for (x, y, z), which is (z, y, x) after the transpose.
        oriented = Orientation(axcodes="LPS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
        return np.asarray(oriented[0]).transpose(2, 1, 0).astype(np.float32)


def _resize_to(channels: np.ndarray, channel_names: Sequence[str], shape: tuple[int, int, int]) -> np.ndarray:
    """Resize (C, Z, Y, X) channels: CT trilinear, masks nearest neighbour."""
    tensor = torch.from_numpy(channels)[None]
    ct = F.interpolate(tensor[:, :1], size=shape, mode="trilinear", align_corners=False)
    masks = F.interpolate(tensor[:, 1:], size=shape, mode="nearest") if len(channel_names) > 1 else tensor[:, 1:]
    return torch.cat([ct, masks], dim=1)[0].numpy().astype(np.float32)
