"""Probe where a denoiser puts a lesion for different lobes named in the text.

Run from the repository root:

    python bench/probe_placement.py [--checkpoint FILE] [--time 0.95]

One held-out phantom with a right lower lobe consolidation is noised to time t,
with the same noise for every prompt. For "Consolidation in the <lobe>." with
four lobe names, the script prints the centre of the predicted lesion in native
voxels. The centre weights each voxel by the square of the lesion channel's x0
prediction above its median. Here x runs from the patient's right to left and z
from inferior to superior. A model that follows the text moves the centre with
the lobe, because at high t the noisy input no longer shows the lesion.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

LOBES = {"RUL": "right upper lobe", "RLL": "right lower lobe", "LUL": "left upper lobe", "LLL": "left lower lobe"}


def main() -> None:
    from medsyn_xai.config import EVAL_SEED_OFFSET, load_settings
    from medsyn_xai.data import phantom_case
    from medsyn_xai.model.diffusion import TIME_SCALE, q_sample
    from medsyn_xai.model.registry import load_model
    from medsyn_xai.phantom import random_spec
    from medsyn_xai.text.encoder import TextEncoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="", help="weights to probe (default: the shipped default model)")
    parser.add_argument("--time", type=float, default=0.95, help="diffusion time t in (0, 1) (default: 0.95)")
    args = parser.parse_args()

    settings = load_settings(None)
    if args.checkpoint:
        from dataclasses import replace

        settings = replace(settings, model=replace(settings.model, checkpoint=args.checkpoint))
    loaded = load_model(settings.model)
    model = loaded.model.eval()
    encoder = TextEncoder(max_tokens=loaded.config.text_tokens)
    names = loaded.channel_names or settings.model.channel_names
    native = loaded.native_shape or (settings.model.depth, settings.model.height, settings.model.width)

    seed = next(
        seed
        for seed in range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + 1000)
        if random_spec(seed, max_findings=1, p_normal=0.0, p_uncertain=0.0, kinds=("consolidation",)).findings[0].lobe
        == "RLL"
    )
    spec_options = {"max_findings": 1, "p_normal": 0.0, "p_uncertain": 0.0, "kinds": ("consolidation",)}
    case = phantom_case(seed, channel_names=names, native_shape=native, spec_options=spec_options)
    x0 = torch.from_numpy(case["image"])[None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = q_sample(x0, torch.tensor([args.time], dtype=torch.float64), noise).float()
    lesion = list(names).index("lesion")

    print(f"phantom seed {seed}, t = {args.time}, native grid {tuple(native)}")
    for lobe, words in LOBES.items():
        encoded = encoder.encode(f"Consolidation in the {words}.")
        with torch.no_grad():
            prediction = model(x_t, torch.tensor([args.time * TIME_SCALE]), encoded.embeddings, encoded.attention_mask)
        evidence = (prediction[0, lesion] - prediction[0, lesion].median()).clamp(min=0) ** 2  # (z, y, x)
        total = evidence.sum()
        z = float((evidence.sum((1, 2)) * torch.arange(evidence.shape[0])).sum() / total)
        x = float((evidence.sum((0, 1)) * torch.arange(evidence.shape[2])).sum() / total)
        print(f"{lobe}: lesion centre z = {z:5.2f}, x = {x:5.2f}")


if __name__ == "__main__":
    main()
