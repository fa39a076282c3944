"""Small real study stores for the render tests, built with write_study and write_entities.

The CT is a torso phantom: air outside an elliptic body of soft tissue with two
lungs, optionally a bright blob at a chosen voxel. Each entity's heatmap is a
Gaussian centred at the voxel each test passes. Other render test files import these helpers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsyn_xai.store import SampledStudy, StudyStore, write_entities, write_study

PROMPT = "Spiculated nodule in the right upper lobe. No pleural effusion. Possible ground glass in the left lower lobe."

# (text, label, assertion, centre (z, y, x) as fractions of the grid)
ENTITIES = [
    ("nodule", "FINDING", "present", (0.7, 0.3, 0.25)),
    ("right upper lobe", "BODY_PART", "present", (0.7, 0.35, 0.3)),
    ("pleural effusion", "FINDING", "absent", (0.2, 0.7, 0.5)),
    ("ground glass", "FINDING", "uncertain", (0.3, 0.5, 0.75)),
    ("left lower lobe", "BODY_PART", "present", (0.3, 0.55, 0.75)),
]

PROVENANCE = {
    "seed": 7,
    "sampler": {"name": "ddim", "steps": 3, "guidance_scale": 1.0},
    "model": {"name": "medsyn-tiny", "checkpoint_sha256": "ab" * 32},
    "text_encoder": {"name": "minilm", "hidden_size": 384},
}


def word_tokens(prompt: str, *, n_padding: int = 6) -> list[dict]:
    """Return token records: [CLS], one per word (punctuation kept on the word), [SEP], then padding."""
    tokens = [{"index": 0, "text": "[CLS]", "start": 0, "end": 0, "special": True}]
    position = 0
    for word in prompt.split():
        start = prompt.index(word, position)
        position = start + len(word)
        text = word.lower().strip(".,")
        tokens.append({"index": len(tokens), "text": text, "start": start, "end": position, "special": False})
    tokens.append({"index": len(tokens), "text": "[SEP]", "start": 0, "end": 0, "special": True})
    for _ in range(n_padding):
        tokens.append({"index": len(tokens), "text": "[PAD]", "start": 0, "end": 0, "special": True})
    return tokens


def torso_ct(
    shape: tuple[int, int, int], *, blob: tuple[int, int, int] | None = None, blob_hu: int = 400
) -> np.ndarray:
    """int16 (Z, Y, X) phantom in HU: air -1000, body 40, lungs -850, optional cube of ``blob_hu`` at ``blob``."""
    size_z, size_y, size_x = shape
    _, rows, columns = np.indices(shape)
    ry, rx = (rows - (size_y - 1) / 2) / (0.45 * size_y), (columns - (size_x - 1) / 2) / (0.45 * size_x)
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[ry**2 + rx**2 <= 1] = 40
    for centre in (0.3, 0.7):
        lung = ((rows - size_y / 2) / (0.3 * size_y)) ** 2 + ((columns - centre * size_x) / (0.15 * size_x)) ** 2 <= 1
        ct[lung] = -850
    if blob is not None:
        z, y, x = blob
        ct[max(z - 1, 0) : z + 2, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = blob_hu
    return ct


def gaussian(shape: tuple[int, int, int], centre: tuple[float, float, float], sigma: float = 2.5) -> np.ndarray:
    """float32 (Z, Y, X) Gaussian bump of peak 0.5 centred at voxel ``centre``."""
    grid = np.indices(shape, dtype=np.float32)
    distance = sum((axis - float(value)) ** 2 for axis, value in zip(grid, centre))
    return (0.5 * np.exp(-distance / (2 * sigma**2))).astype(np.float32)


def entity_dicts(prompt: str, tokens: list[dict], specs: list[tuple]) -> list[dict]:
    """Entity dicts with character offsets found in ``prompt`` and the word tokens they overlap."""
    entities = []
    for text, label, assertion, _ in specs:
        start = prompt.index(text)
        end = start + len(text)
        indices = [t["index"] for t in tokens if not t["special"] and t["start"] < end and start < t["end"]]
        entities.append({
            "text": text, "label": label, "start": start, "end": end, "assertion": assertion,
            "backend": "test", "backend_version": "1", "token_indices": indices, "covered": bool(indices),
        })
    return entities


def write_render_study(
    root: Path,
    *,
    study_id: str = "case",
    shape: tuple[int, int, int] = (32, 32, 32),
    spacing_mm: tuple[float, float, float] = (2.0, 1.0, 1.0),
    specs: list[tuple] | None = None,
    blob: tuple[int, int, int] | None = None,
    heatmaps: np.ndarray | None = None,
    explained: bool = True,
    prompt: str = PROMPT,
) -> StudyStore:
    """Write a study with ``specs`` entities (default: ENTITIES) and return it opened.

    ``heatmaps`` replaces the Gaussians; ``explained=False`` leaves out the NER step.
    """
    specs = ENTITIES if specs is None else specs
    tokens = word_tokens(prompt)
    rng = np.random.default_rng(0)
    raw = rng.random((len(tokens), shape[0] // 2, shape[1] // 2, shape[2] // 2)).astype(np.float32)
    saliency = (raw / raw.sum(axis=0, keepdims=True)).astype(np.float32)  # sums to 1 over tokens per voxel
    study = SampledStudy(
        study_id=study_id,
        prompt=prompt,
        ct=torso_ct(shape, blob=blob),
        masks={},
        tokens=tokens,
        saliency=saliency,
        spacing_mm=spacing_mm,
        attrs=dict(PROVENANCE),
    )
    path = write_study(root, study)
    if explained:
        if heatmaps is None:
            centres = [tuple(fraction * (size - 1) for fraction, size in zip(spec[3], shape)) for spec in specs]
            heatmaps = np.zeros((0, *shape), np.float32)  # (E, Z, Y, X) with E = 0
            if specs:
                heatmaps = np.stack([gaussian(shape, centre) for centre in centres])
        write_entities(path, entity_dicts(prompt, tokens, specs), heatmaps, backend="test", backend_version="1")
    return StudyStore.open(path)


def test_render_study_is_valid(tmp_path):
    store = write_render_study(tmp_path)
    store.validate()
    assert len(store.entities) == len(ENTITIES)
    assert store.entity_heatmaps.shape == (len(ENTITIES), 32, 32, 32)
    assert all(entity["covered"] for entity in store.entities)
    assert np.allclose(store.saliency().sum(axis=0), 1.0, atol=1e-5)
