"""The ``medsyn-xai`` command line.

Usage errors and invalid input exit with status 2 and one line on stderr that names
the value and the fix; other failures exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """Invalid input from the user; reported on one line with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="medsyn-xai",
        description="Generate synthetic chest CT from report text and explain it with token and entity heatmaps.",
    )
    parser.add_argument("--log-level", default="INFO", help="minimum log level (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate one study from a prompt")
    generate.add_argument("prompt", help="radiology report text")
    generate.add_argument("--out", required=True, type=Path, help="data root; the store goes to OUT/studies/ID.zarr")
    generate.add_argument("--study-id", help="study id (default: generated from the time)")
    generate.add_argument("--seed", type=int, help="seed of the starting noise (default: sampler.seed)")
    generate.add_argument("--steps", type=int, help="DDIM steps (default: sampler.steps)")
    generate.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale, 1.0 is off")
    generate.add_argument("--config", type=Path, help="settings file (TOML)")
    generate.add_argument("--overwrite", action="store_true", help="replace an existing study with the same id")
    generate.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    info = commands.add_parser("info", help="summarise a study store")
    info.add_argument("store", type=Path, help="path of a <id>.zarr store")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")

    export = commands.add_parser("export", help="export a study's volumes")
    export.add_argument("store", type=Path, help="path of a <id>.zarr store")
    export.add_argument("--format", choices=["nifti"], default="nifti", help="output format (default: nifti)")
    export.add_argument("--out", required=True, type=Path, help="folder to write the files to")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)

    from medsyn_xai.logs import configure_logging

    try:
        configure_logging(args.log_level)
    except ValueError as error:
        return _fail(str(error), EXIT_USAGE)

    handler = {"generate": _generate, "info": _info, "export": _export}[args.command]
    try:
        return handler(args)
    except UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, status: int) -> int:
    print(f"medsyn-xai: error: {message}", file=sys.stderr)
    return status


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input rather than a bug, for exit status 2."""
    from medsyn_xai.config import ConfigError
    from medsyn_xai.model.checkpoint import CheckpointError
    from medsyn_xai.store import StoreError
    from medsyn_xai.text.encoder import TextEncoderError

    return (ConfigError, CheckpointError, StoreError, TextEncoderError, ValueError)


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from medsyn_xai.config import load_settings
    from medsyn_xai.pipeline.generate import GenerationRequest, StudyGenerator, check_request, preflight

    request = GenerationRequest(
        prompt=args.prompt,
        study_id=args.study_id,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
    )
    try:
        check_request(request)
        settings = load_settings(args.config)
        preflight(args.out, request.study_id, overwrite=args.overwrite)
        generator = StudyGenerator(settings)
    except _input_errors() as error:
        raise UsageError(str(error)) from None

    steps = request.steps or settings.sampler.steps
    with tqdm(total=steps, desc="sampling", unit="step", disable=args.no_progress, file=sys.stderr) as bar:
        try:
            path = generator.generate(request, args.out, overwrite=args.overwrite, progress=bar.update)
        except _input_errors() as error:
            raise UsageError(str(error)) from None
    print(path)
    return 0


def _open_store(path: Path):
    from medsyn_xai.store import StoreError, StudyStore

    try:
        return StudyStore.open(path)
    except StoreError as error:
        raise UsageError(str(error)) from None


def _info(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    summary = store.summary()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(_format_summary(summary))
    return 0


def _format_summary(summary: dict) -> str:
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {name}: {item}" for name, item in value.items())
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{key}: {len(value)}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def _export(args: argparse.Namespace) -> int:
    from medsyn_xai.store import StoreError, export_nifti

    store = _open_store(args.store)
    try:
        paths = export_nifti(store, args.out)
    except (StoreError, OSError) as error:
        raise UsageError(f"export to '{args.out}' failed: {error}") from None
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
