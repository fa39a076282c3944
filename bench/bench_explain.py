"""Benchmark the explain job against the per-file method of the original Medsyn_XAI scripts.

Run from the repository root:

    python bench/bench_explain.py --repeats 20 --out bench/results/explain.json

Both methods start from the same synthetic study: a 64^3 CT and token maps of
shape (192, 64, 8, 8), the MedSyn layout of 192 CXR-BERT positions, for a prompt
with 10 entities. Tokens come from the bundled MiniLM tokenizer padded to 192.

1. explain job: ``StudyExplainer.explain`` on the Zarr store with the rules NER
   backend already loaded, ``reuse_ner=False`` so NER runs every time. Each run
   reads the token maps, runs NER, aligns, resizes all entities in one batched
   call and writes ``entities/heatmaps`` and the ``.explained`` marker, replacing
   the ``entities`` group of the run before (a daemon's first explain of a study
   has none to remove, so the timing errs on the slow side).
2. original method: one ``.npy`` per token written beforehand in the original
   file layout. Per entity: list the folder, match each file's token string
   against the entity's words, ``np.load`` and ``scipy.ndimage.zoom(order=1)``
   every matched (64, 8, 8) map to 64^3, ``np.mean`` and ``np.save``. Its timing
   leaves out NER, which the original ran separately.

Both are timed alternately in one process after one warm-up run each; the
figures are medians over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

PROMPT = (
    "Spiculated 2 cm mass in the left upper lobe. Small right pleural effusion. "
    "No pneumothorax. Possible ground-glass opacity in the right lower lobe."
)
N_TOKENS = 192
NATIVE_GRID = (64, 8, 8)
OUTPUT_GRID = (64, 64, 64)


def write_synthetic_study(root: Path, seed: int = 0) -> Path:
    """Write a sampled study with real token offsets and random token maps that sum to 1 per voxel."""
    from medsyn_xai.store import SampledStudy, write_study
    from medsyn_xai.text.encoder import TextEncoder

    encoder = TextEncoder(max_tokens=N_TOKENS)
    records, _, truncated, n_prompt_tokens = encoder.tokenize(PROMPT)
    rng = np.random.default_rng(seed)
    raw = rng.random((N_TOKENS, *NATIVE_GRID)).astype(np.float32)
    saliency = (raw / raw.sum(axis=0, keepdims=True)).astype(np.float32)
    study = SampledStudy(
        study_id="bench",
        prompt=PROMPT,
        ct=rng.integers(-1000, 400, size=OUTPUT_GRID, dtype=np.int16),
        masks={},
        tokens=[record.to_dict() for record in records],
        saliency=saliency,
        spacing_mm=(5.0, 6.0, 6.0),
        attrs={
            "seed": seed,
            "sampler": {"method": "synthetic"},
            "model": {"name": "synthetic", "checkpoint_sha256": None},
            "text_encoder": encoder.description,
            "truncated": truncated,
            "prompt_tokens": n_prompt_tokens,
        },
    )
    return write_study(root, study)


def write_original_layout(folder: Path, tokens: list[dict], saliency: np.ndarray) -> None:
    """Save one (64, 8, 8) map per token as <study>_sample_0_token_<index>_<token>_heatmaps.npy."""
    folder.mkdir(parents=True, exist_ok=True)
    for token, token_map in zip(tokens, saliency, strict=True):
        name = f"bench_sample_0_token_{token['index']}_{token['text'].replace('/', '_')}_heatmaps.npy"
        np.save(folder / name, token_map)


def run_original(folder: Path, out_dir: Path, entity_texts: list[str]) -> int:
    """Compute and save every entity heatmap the per-file way; return the number of files written."""
    from scipy.ndimage import zoom

    factors = tuple(target / source for target, source in zip(OUTPUT_GRID, NATIVE_GRID))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for text in entity_texts:
        words = text.lower().split()
        matched = []
        for name in sorted(os.listdir(folder)):
            token = name.split("_token_", 1)[1].split("_", 1)[1].removesuffix("_heatmaps.npy")
            piece = token.removeprefix("##")
            if piece and any(piece in word for word in words):
                matched.append(name)
        if not matched:
            continue
        resized = [zoom(np.load(folder / name), factors, order=1) for name in matched]
        heatmap = np.mean(resized, axis=0).astype(np.float32)
        np.save(out_dir / f"{text.replace(' ', '_')}_heatmap.npy", heatmap)
        written += 1
    return written


def time_stages(explainer, path: Path, repeats: int) -> dict[str, float]:
    """Median milliseconds of each step of the explain job, timed one step at a time.

    "write_through_zarr_reference" is not a job step: it writes the same heatmaps
    with the same chunks through Zarr's own ``create_array(data=...)`` into a
    scratch group, to show what writing the chunk files directly saves. Each
    "write" replaces the ``entities`` group of the previous run, as the timed
    job does.
    """
    import zarr

    from medsyn_xai.align import align_entities
    from medsyn_xai.pipeline.explain import _check_token_map_shape, _read_token_maps, entity_heatmaps
    from medsyn_xai.store import StudyStore, write_entities
    from medsyn_xai.text.tokens import TokenRecord

    stages: dict[str, list[float]] = {
        "open": [],
        "read": [],
        "ner": [],
        "align": [],
        "heatmaps": [],
        "write": [],
        "write_through_zarr_reference": [],
    }
    scratch = zarr.open_group(path.parent.parent / "uncompressed.zarr", mode="w")
    for _ in range(repeats):
        start = time.perf_counter()
        store = StudyStore.open(path)
        tokens = [TokenRecord.from_dict(token) for token in store.tokens]
        _check_token_map_shape(store, len(tokens))
        grid = store.ct_shape
        stages["open"].append(time.perf_counter() - start)

        start = time.perf_counter()
        entities = explainer.backend.extract(store.prompt)
        stages["ner"].append(time.perf_counter() - start)

        start = time.perf_counter()
        aligned = align_entities(entities, tokens)
        stages["align"].append(time.perf_counter() - start)

        start = time.perf_counter()
        used = sorted({index for entity in aligned for index in entity.token_indices})
        token_maps = _read_token_maps(store, used)
        stages["read"].append(time.perf_counter() - start)

        start = time.perf_counter()
        heatmaps = entity_heatmaps(aligned, token_maps, grid, token_indices=used)
        stages["heatmaps"].append(time.perf_counter() - start)

        start = time.perf_counter()
        entity_dicts = [entity.to_dict() for entity in aligned]
        write_entities(store, entity_dicts, heatmaps, backend="rules", backend_version="bench")
        stages["write"].append(time.perf_counter() - start)

        start = time.perf_counter()
        if "heatmaps" in scratch:
            del scratch["heatmaps"]
        scratch.create_array("heatmaps", data=heatmaps, chunks=(1, *heatmaps.shape[1:]), compressors=None)
        stages["write_through_zarr_reference"].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(times) for name, times in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each method (default: 20)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()

    import structlog
    import torch

    from medsyn_xai.ner import get_backend
    from medsyn_xai.pipeline.explain import StudyExplainer
    from medsyn_xai.store import StudyStore

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only while timing

    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        path = write_synthetic_study(scratch_path / "root")
        store = StudyStore.open(path)
        write_original_layout(scratch_path / "legacy", store.tokens, store.saliency())

        explainer = StudyExplainer(get_backend("rules"))
        entity_texts = [entity.text for entity in explainer.backend.extract(PROMPT)]

        explainer.explain(path, reuse_ner=False)  # warm-up of both methods
        run_original(scratch_path / "legacy", scratch_path / "original", entity_texts)
        job_times, original_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = explainer.explain(path, reuse_ner=False)
            job_times.append(time.perf_counter() - start)

            start = time.perf_counter()
            n_original = run_original(scratch_path / "legacy", scratch_path / "original", entity_texts)
            original_times.append(time.perf_counter() - start)
        stages = time_stages(explainer, path, args.repeats)

    job_ms = 1000 * statistics.median(job_times)
    original_ms = 1000 * statistics.median(original_times)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        },
        "command": "python " + " ".join(sys.argv),
        "study": {
            "tokens": N_TOKENS,
            "native_grid": list(NATIVE_GRID),
            "output_grid": list(OUTPUT_GRID),
            "entities": len(result.entities),
            "entities_written_by_original": n_original,
        },
        "repeats": args.repeats,
        "explain_job_median_ms": round(job_ms, 1),
        "original_median_ms": round(original_ms, 1),
        "speedup": round(original_ms / job_ms, 2),
        "explain_job_stage_median_ms": {name: round(value, 2) for name, value in stages.items()},
        "explain_job_times_ms": [round(1000 * value, 1) for value in job_times],
        "original_times_ms": [round(1000 * value, 1) for value in original_times],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
