"""Benchmark the saliency capture: time overhead, memory versus steps, wall time.

Run from the repository root:

    python bench/bench_capture.py --repeats 5 --out bench/results/capture.json

Three measurements, all with the settings of ``--config`` (default: built-in
defaults, so the shipped default model):

1. overhead: sampling with and without capture, same seed, alternating in one
   process; the ratio of the median wall times.
2. memory: peak resident memory of a fresh process that samples with capture at
   10 and at 50 steps; the relative difference.
3. wall time of one complete study (encode with negated entities hidden, sample
   with capture, decode to the output grid), median over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def time_sampling(config: Path | None, repeats: int) -> dict:
    import torch

    from medsyn_xai.config import load_settings
    from medsyn_xai.model.diffusion import sample
    from medsyn_xai.model.volume import decode_volume
    from medsyn_xai.pipeline.generate import StudyGenerator
    from medsyn_xai.saliency.capture import SaliencyCapture

    settings = load_settings(config)
    generator = StudyGenerator(settings)
    model = generator.model
    context = generator.text_encoder.encode("Spiculated 2 cm mass in the left upper lobe. No pleural effusion.").embeddings
    steps = settings.sampler.steps
    shape = generator.native_shape

    def plain() -> torch.Tensor:
        return sample(model, context, shape=shape, seed=0, steps=steps)

    def captured() -> torch.Tensor:
        with SaliencyCapture(model) as capture:
            volume = sample(model, context, shape=shape, seed=0, steps=steps, observer=capture)
        capture.token_maps()
        return volume

    plain()  # warm-up: first-call allocations and kernel selection
    plain_times, capture_times = [], []
    for _ in range(repeats):
        for run, times in ((plain, plain_times), (captured, capture_times)):
            start = time.perf_counter()
            volume = run()
            times.append(time.perf_counter() - start)
    identical = bool(torch.equal(plain(), captured()))

    study_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoded = generator.encode_prompt("Moderate right pleural effusion with adjacent atelectasis. No pneumothorax.")
        with SaliencyCapture(model) as capture:
            volume = sample(
                model, encoded.embeddings, context_mask=encoded.attention_mask, shape=shape, seed=1, steps=steps,
                observer=capture,
            )
        capture.token_maps()
        decode_volume(volume, settings.model.channel_names, settings.output.grid)
        study_times.append(time.perf_counter() - start)

    return {
        "steps": steps,
        "native_shape": list(shape),
        "output_grid": list(settings.output.grid),
        "model_weights": generator.loaded.weights,
        "plain_median_s": statistics.median(plain_times),
        "capture_median_s": statistics.median(capture_times),
        "overhead_ratio": statistics.median(capture_times) / statistics.median(plain_times),
        "captured_equals_plain": identical,
        "study_median_s": statistics.median(study_times),
        "study_times_s": study_times,
    }


def peak_memory_child(config: Path | None, steps: int) -> None:
    """Sample once with capture at ``steps`` steps and print the peak RSS in KiB."""
    from medsyn_xai.config import load_settings
    from medsyn_xai.model.diffusion import sample
    from medsyn_xai.pipeline.generate import StudyGenerator
    from medsyn_xai.saliency.capture import SaliencyCapture

    settings = load_settings(config)
    generator = StudyGenerator(settings)
    context = generator.text_encoder.encode("Small nodule in the right lower lobe.").embeddings
    with SaliencyCapture(generator.model) as capture:
        sample(generator.model, context, shape=generator.native_shape, seed=0, steps=steps, observer=capture)
    capture.token_maps()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def measure_memory(config: Path | None) -> dict:
    peaks = {}
    for steps in (10, 50):
        command = [sys.executable, __file__, "--memory-child", str(steps)]
        if config is not None:
            command += ["--config", str(config)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        peaks[steps] = int(output.strip().splitlines()[-1])
    return {
        "peak_rss_kib_10_steps": peaks[10],
        "peak_rss_kib_50_steps": peaks[50],
        "relative_difference": (peaks[50] - peaks[10]) / peaks[10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="settings file (default: built-in defaults)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each kind (default: 5)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child is not None:
        peak_memory_child(args.config, args.memory_child)
        return

    import torch

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "command": "python " + " ".join(sys.argv),
        "timing": time_sampling(args.config, args.repeats),
        "memory": measure_memory(args.config),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
