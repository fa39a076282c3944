"""Compare token-map aggregations (layers x steps) on the evaluation's located cases.

Run from the repository root:

    python bench/probe_aggregation.py [--n 48] [--guidance-scale 1.0] [--checkpoint FILE] [--finding KIND]

The script samples the located cases among the first ``--n`` held-out cases of
``medsyn-xai evaluate`` (same seeds, same reports) once each, with one capture per
aggregation attached to the same sampling run. For each aggregation it scores
the finding word's heatmap against the generated lesion with the pointing game,
mass in mask and AUROC, and prints the means over the cases that drew a lesion.
Two more columns help to read them: "lift", the heatmap's mean inside the lesion
over its mean over the volume (1 = no better than a flat map), and "edge", the
fraction of cases whose heatmap peaks in the outermost attention cell along y or
x, which is air around the body in these phantoms (the body reaches the top and
bottom slices, so z does not count).
``--finding KIND`` keeps only the cases of one finding kind.
The "all layers, all steps" row equals the full aggregation of ``evaluate``, and
"layer 3, last step" its baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

N_STEPS = 50


def aggregations(model) -> dict:
    """Return one fresh capture per aggregation, keyed by a readable name."""
    from medsyn_xai.saliency.capture import SaliencyCapture

    n_layers = len(model.cross_attention_layers())
    half = N_STEPS // 2
    captures = {"all layers, all steps": SaliencyCapture(model)}
    for layer in range(n_layers):
        captures[f"layer {layer}, all steps"] = SaliencyCapture(model, layers=[layer])
    captures["all layers, first half of steps"] = SaliencyCapture(model, steps=list(range(half)))
    captures["all layers, second half of steps"] = SaliencyCapture(model, steps=list(range(half, N_STEPS)))
    captures["all layers, last step"] = SaliencyCapture(model, steps=[N_STEPS - 1])
    captures[f"layer {n_layers - 1}, last step"] = SaliencyCapture(model, layers=[n_layers - 1], steps=[N_STEPS - 1])
    return captures


def main() -> None:
    from dataclasses import replace

    from medsyn_xai.config import load_settings
    from medsyn_xai.evaluate import finding_tokens, held_out_case
    from medsyn_xai.metrics import auroc, mass_in_mask, pointing_game
    from medsyn_xai.model.diffusion import sample
    from medsyn_xai.model.volume import decode_volume
    from medsyn_xai.pipeline.generate import StudyGenerator
    from medsyn_xai.saliency.capture import ObserverGroup
    from medsyn_xai.saliency.resize import resize_maps

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="held-out cases to draw from, as in evaluate (default: 48)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (default: 1.0)")
    parser.add_argument("--checkpoint", default="", help="weights to probe (default: the shipped default model)")
    parser.add_argument("--finding", default="", help="probe only cases of this finding kind, for example mass")
    args = parser.parse_args()

    settings = load_settings(None)
    if args.checkpoint:
        settings = replace(settings, model=replace(settings.model, checkpoint=args.checkpoint))
    generator = StudyGenerator(settings)
    model = generator.model
    grid = settings.output.grid
    factor = generator.loaded.config.downsample_factor
    attention_grid = (generator.native_shape[1] // factor, generator.native_shape[2] // factor)

    scores: dict[str, list[tuple[float, float, float, float, float]]] = {}
    cases = [held_out_case(index) for index in range(args.n)]
    located = [case for case in cases if case.kind == "located"]
    if args.finding:
        located = [case for case in located if case.spec.findings[0].kind == args.finding]
    for case in located:
        encoded = generator.encode_prompt(case.report.text)

        captures = aggregations(model)
        with contextlib.ExitStack() as stack:
            for capture in captures.values():
                stack.enter_context(capture)
            x0 = sample(
                model,
                encoded.embeddings,
                context_mask=encoded.attention_mask,
                shape=generator.native_shape,
                seed=case.seed,
                steps=N_STEPS,
                guidance_scale=args.guidance_scale,
                observer=ObserverGroup(*captures.values()),
            )
        _, masks = decode_volume(x0, generator.channel_names, grid)
        lesion = masks["lesion"] > 0
        if not lesion.any():
            continue

        tokens = finding_tokens(case, encoded.tokens)
        for name, capture in captures.items():
            maps = capture.token_maps(*attention_grid)[tokens].mean(dim=0, keepdim=True)
            heatmap = resize_maps(maps, grid)[0].numpy()
            cell = [size // native for size, native in zip(grid, maps.shape[1:])]  # output voxels per map cell
            peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            at_edge = any(peak[axis] < cell[axis] or peak[axis] >= grid[axis] - cell[axis] for axis in (1, 2))
            row = (
                float(pointing_game(heatmap, lesion)),
                mass_in_mask(heatmap, lesion),
                auroc(heatmap, lesion),
                float(heatmap[lesion].mean() / heatmap.mean()),
                float(at_edge),
            )
            scores.setdefault(name, []).append(row)

    n_cases = len(next(iter(scores.values()), []))
    kind = f" ({args.finding})" if args.finding else ""
    print(f"{n_cases} of {len(located)} located cases{kind} drew a lesion; guidance {args.guidance_scale}")
    print(f"{'aggregation':36s} {'pointing':>8s} {'mass':>7s} {'auroc':>6s} {'lift':>5s} {'edge':>5s}")
    for name, rows in scores.items():
        pointing, mass, roc_area, lift, edge = np.mean(np.array(rows), axis=0)
        print(f"{name:36s} {pointing:8.2f} {mass:7.3f} {roc_area:6.2f} {lift:5.2f} {edge:5.2f}")


if __name__ == "__main__":
    main()
