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

    train = commands.add_parser("train", help="train a denoiser on phantoms or NIfTI data")
    train.add_argument("--config", required=True, type=Path, help="settings file with a [train] table")
    train.add_argument("--resume", action="store_true", help="continue from OUT_DIR/latest.pt")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    evaluate = commands.add_parser("evaluate", help="score text following and explanations on held-out phantoms")
    evaluate.add_argument("--n", type=int, default=24, help="held-out cases (default: 24)")
    evaluate.add_argument("--seed", type=int, default=0, help="offset of the held-out case seeds, which start at 10,000,000 (default: 0)")
    evaluate.add_argument("--steps", type=int, help="DDIM steps (default: sampler.steps)")
    evaluate.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default: sampler setting)")
    evaluate.add_argument("--checkpoint", type=Path, help="weights to evaluate (default: the configured model)")
    evaluate.add_argument("--config", type=Path, help="settings file (TOML)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    info = commands.add_parser("info", help="summarise a study store")
    info.add_argument("store", type=Path, help="path of a <id>.zarr store")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")

    export = commands.add_parser("export", help="export a study's volumes")
    export.add_argument("store", type=Path, help="path of a <id>.zarr store")
    export.add_argument(
        "--format",
        choices=["nifti", "npy"],
        default="nifti",
        help="nifti: CT, masks and entity heatmaps as .nii.gz; npy: one <entity>_heatmap.npy per entity (default: nifti)",
    )
    export.add_argument("--out", required=True, type=Path, help="folder to write the files to")

    _add_ner_commands(commands)
    _add_render_commands(commands)
    _add_pipeline_commands(commands)
    return parser


def _add_ner_commands(commands: argparse._SubParsersAction) -> None:
    """Add the entity sub-commands: ner, ner-eval, explain and import-legacy."""
    ner = commands.add_parser("ner", help="list the clinical entities of a text")
    ner.add_argument("text", help="radiology report text")
    _add_backend_options(ner)
    ner.add_argument("--json", action="store_true", help="print a JSON list of {text, label, start, end, assertion}")

    ner_eval = commands.add_parser("ner-eval", help="score an NER backend against a gold JSON-lines file")
    ner_eval.add_argument(
        "--gold", type=Path, help="gold file (default: tests/data/ner_gold.jsonl under the current folder)"
    )
    _add_backend_options(ner_eval)
    ner_eval.add_argument("--json", action="store_true", help="print the full scores and errors as JSON")

    explain = commands.add_parser("explain", help="write entity heatmaps into a sampled study store")
    explain.add_argument("store", type=Path, help="path of a <id>.zarr store with its .sampled marker")
    explain.add_argument(
        "--grid", nargs=3, metavar=("Z", "Y", "X"), help="heatmap grid in voxels (default: the CT grid)"
    )
    _add_backend_options(explain)

    legacy = commands.add_parser("import-legacy", help="import a folder of Medsyn_XAI per-token .npy maps")
    legacy.add_argument("folder", type=Path, help="folder of <study>_sample_<n>_token_<index>_<token>_heatmaps.npy")
    legacy.add_argument("--prompt", required=True, help="report text the maps were generated from")
    legacy.add_argument("--out", required=True, type=Path, help="data root; the store goes to OUT/studies/ID.zarr")
    legacy.add_argument("--study-id", help="study id (default: the study name in the file names)")
    legacy.add_argument(
        "--config", type=Path, help="settings file (TOML): text encoder, output grid and spacing of the empty CT"
    )
    legacy.add_argument("--overwrite", action="store_true", help="replace an existing study with the same id")


def _add_backend_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", help="NER backend: rules or transformer (default: ner.backend, rules)")
    parser.add_argument(
        "--model-folder", type=Path, help="token-classification folder of the transformer backend (default: ner.model_folder)"
    )
    parser.add_argument("--config", type=Path, help="settings file (TOML)")


def _add_render_commands(commands: argparse._SubParsersAction) -> None:
    """Add the picture sub-commands: render and report."""
    window_help = "CT window: lung (W1500 L-600) or mediastinum (W350 L50) (default: lung)"
    render = commands.add_parser("render", help="draw entity heatmaps on the CT as PNG files")
    render.add_argument("store", type=Path, help="path of a <id>.zarr store")
    render.add_argument("--entity", metavar="TEXT", help="render only the entity with this text (default: all)")
    render.add_argument("--window", default="lung", help=window_help)
    render.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG files (default: .)")
    render.add_argument(
        "--joint", nargs=2, metavar=("TEXT", "TEXT"), help="draw where both entities' heatmaps are high, with their Dice"
    )

    report = commands.add_parser("report", help="write a self-contained HTML report of a study")
    report.add_argument("store", type=Path, help="path of a <id>.zarr store")
    report.add_argument("--out", type=Path, help="HTML file (default: <study id>_report.html in the current folder)")
    report.add_argument("--window", default="lung", help=window_help)


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

    handler = {
        "generate": _generate,
        "info": _info,
        "export": _export,
        "train": _train,
        "evaluate": _evaluate,
        "ner": _ner,
        "ner-eval": _ner_eval,
        "explain": _explain,
        "import-legacy": _import_legacy,
        "render": _render,
        "report": _report,
        "serve": _serve,
        "status": _status,
    }[args.command]
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

        def advance(n_steps: int) -> None:
            # Close the bar after the last step, so the log lines written with the study do not redraw it.
            bar.update(n_steps)
            if bar.n >= steps:
                bar.close()

        try:
            path = generator.generate(request, args.out, overwrite=args.overwrite, progress=advance)
        except _input_errors() as error:
            raise UsageError(str(error)) from None
    print(path)
    return 0


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from medsyn_xai.config import load_settings
    from medsyn_xai.data import DataError
    from medsyn_xai.train import Trainer, TrainingError

    try:
        settings = load_settings(args.config)
        with tqdm(desc="building data", unit="case", disable=args.no_progress, file=sys.stderr) as bar:
            trainer = Trainer(settings, progress=bar.update)
        state = trainer.resume_or_new(args.resume)
    except (*_input_errors(), DataError, TrainingError) as error:
        raise UsageError(str(error)) from None

    with tqdm(
        total=settings.train.steps, initial=state.step, desc="training", unit="step",
        disable=args.no_progress, file=sys.stderr,
    ) as bar:
        trainer.fit(state, progress=bar.update)
    print(trainer.out_dir / "model.safetensors")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import dataclasses

    from tqdm import tqdm

    from medsyn_xai.config import load_settings
    from medsyn_xai.evaluate import evaluate_model
    from medsyn_xai.pipeline.generate import StudyGenerator

    if args.n < 1:
        raise UsageError(f"--n is {args.n}: evaluate at least one case")
    try:
        settings = load_settings(args.config)
        if args.checkpoint is not None:
            settings = dataclasses.replace(
                settings, model=dataclasses.replace(settings.model, checkpoint=str(args.checkpoint))
            )
        generator = StudyGenerator(settings)
    except _input_errors() as error:
        raise UsageError(str(error)) from None

    with tqdm(total=args.n, desc="evaluating", unit="case", disable=args.no_progress, file=sys.stderr) as bar:
        result = evaluate_model(
            generator, n=args.n, seed=args.seed, steps=args.steps,
            guidance_scale=args.guidance_scale, progress=bar.update,
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_format_summary(result))
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
    from medsyn_xai.pipeline.explain import export_entity_npy
    from medsyn_xai.store import StoreError, export_nifti

    store = _open_store(args.store)
    try:
        paths = export_entity_npy(store, args.out) if args.format == "npy" else export_nifti(store, args.out)
    except (StoreError, OSError) as error:
        raise UsageError(f"export to '{args.out}' failed: {error}") from None
    for path in paths:
        print(path)
    return 0


def _ner_settings(args: argparse.Namespace):
    """Return the ``ner`` settings of ``--config`` with ``--backend`` and ``--model-folder`` applied."""
    import dataclasses

    from medsyn_xai.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config).ner
    except ConfigError as error:
        raise UsageError(str(error)) from None
    if args.backend is not None:
        settings = dataclasses.replace(settings, backend=args.backend)
    if args.model_folder is not None:
        if settings.backend != "transformer":
            message = (
                f"--model-folder is read only by the transformer backend, not {settings.backend!r}: "
                "add --backend transformer or drop --model-folder"
            )
            raise UsageError(message)
        settings = dataclasses.replace(settings, model_folder=str(args.model_folder))
    return settings


def _build_backend(args: argparse.Namespace):
    from medsyn_xai.pipeline.explain import build_ner_backend

    settings = _ner_settings(args)
    try:
        return build_ner_backend(settings)
    except (ValueError, FileNotFoundError, TypeError) as error:
        raise UsageError(str(error).splitlines()[0]) from None


def _ner(args: argparse.Namespace) -> int:
    if not args.text.strip():
        raise UsageError('prompt is empty: pass the report text, for example medsyn-xai ner "No pleural effusion."')
    backend = _build_backend(args)
    entities = backend.extract(args.text)
    columns = ["text", "label", "start", "end", "assertion"]
    rows = [{column: getattr(entity, column) for column in columns} for entity in entities]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    elif not rows:
        print("no entities found")
    else:
        print(_format_table(rows, columns))
    return 0


def _format_table(rows: list[dict], columns: list[str]) -> str:
    """Align ``rows`` in columns; numbers right-aligned, text left-aligned, line breaks shown as spaces."""
    cells = [[" ".join(str(row[column]).split()) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[position]) for line in cells)) for position, column in enumerate(columns)]
    numeric = [all(isinstance(row[column], int) for row in rows) for column in columns]

    def render(values: list[str]) -> str:
        parts = [
            value.rjust(width) if is_number else value.ljust(width)
            for value, width, is_number in zip(values, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([render(columns), *(render(line) for line in cells)])


def _ner_eval(args: argparse.Namespace) -> int:
    from medsyn_xai.ner import evaluate_ner, format_report

    gold = args.gold
    if gold is None:
        gold = Path("tests/data/ner_gold.jsonl")
        if not gold.is_file():
            raise UsageError(f"no --gold file given and '{gold}' is not in the current folder: pass --gold FILE")
    backend = _build_backend(args)
    try:
        result = evaluate_ner(backend, gold)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_report(result))
    return 0


def _parse_grid(values: list[str] | None) -> tuple[int, int, int] | None:
    if values is None:
        return None
    message = f"invalid --grid {' '.join(values)}: pass three positive voxel counts Z Y X, for example --grid 64 64 64"
    try:
        size_z, size_y, size_x = (int(value) for value in values)
    except ValueError:
        raise UsageError(message) from None
    if min(size_z, size_y, size_x) < 1:
        raise UsageError(message)
    return size_z, size_y, size_x


def _explain(args: argparse.Namespace) -> int:
    from medsyn_xai.pipeline.explain import StudyExplainer

    grid = _parse_grid(args.grid)
    _open_store(args.store)  # a missing store or marker fails before the NER model loads
    explainer = StudyExplainer(_build_backend(args))
    try:
        result = explainer.explain(args.store, grid=grid)
    except _input_errors() as error:
        raise UsageError(str(error)) from None

    n_entities = len(result.entities)
    source = "cached in the store" if result.ner_from_cache else "run now"
    print(result.path)
    print(
        f"{n_entities} entities ({n_entities - result.n_uncovered} covered by tokens, {result.n_uncovered} without), "
        f"heatmaps {'x'.join(map(str, result.grid))}, NER {result.backend} {result.backend_version} {source}"
    )
    return 0


def _import_legacy(args: argparse.Namespace) -> int:
    from medsyn_xai.config import load_settings
    from medsyn_xai.legacy import import_legacy, scan_legacy_folder
    from medsyn_xai.text.encoder import TextEncoder

    try:
        settings = load_settings(args.config)
        scan_legacy_folder(args.folder)  # a bad folder fails before the text encoder loads
        encoder = TextEncoder(
            settings.text.folder or None, max_tokens=settings.text.max_tokens, layer=settings.text.layer
        )
        path = import_legacy(
            args.folder,
            args.prompt,
            args.out,
            text_encoder=encoder,
            study_id=args.study_id,
            grid=settings.output.grid,
            spacing_mm=settings.output.spacing_mm,
            overwrite=args.overwrite,
        )
    except _input_errors() as error:
        raise UsageError(str(error)) from None
    print(path)
    return 0


def _render(args: argparse.Namespace) -> int:
    from medsyn_xai.render.maps import entities_of, format_slice_ranges
    from medsyn_xai.render.outputs import write_entity_pngs, write_joint_png

    if args.joint is not None and args.entity is not None:
        raise UsageError("--entity and --joint cannot be combined: pass --joint A B alone, or --entity TEXT alone")
    store = _open_store(args.store)
    try:
        if args.joint is not None:
            path, overlap = write_joint_png(store, args.out, *args.joint, window=args.window)
            print(path)
            print(f"dice {overlap['dice']:.3f} (top {overlap['fraction']:.0%}), overlap on axial slices "
                  f"{format_slice_ranges(overlap['slices'])}")
            return 0
        paths = write_entity_pngs(store, args.out, entity=args.entity, window=args.window)
    except OSError as error:
        message = f"cannot write to '{args.out}' ({error.strerror or error}): choose another --out or fix its permissions"
        raise UsageError(message) from None
    except _input_errors() as error:
        raise UsageError(str(error)) from None
    for path in paths:
        print(path)
    if not entities_of(store):
        print(f"no entities in study '{store.study_id}' (run 'medsyn-xai explain' first): wrote the token chart only")
    return 0


def _report(args: argparse.Namespace) -> int:
    from medsyn_xai.render.outputs import write_report

    store = _open_store(args.store)
    try:
        path = write_report(store, args.out, window=args.window)
    except OSError as error:
        message = f"cannot write '{args.out}' ({error.strerror or error}): choose another --out or fix its permissions"
        raise UsageError(message) from None
    except _input_errors() as error:
        raise UsageError(str(error)) from None
    print(path)
    return 0



def _add_pipeline_commands(commands: argparse._SubParsersAction) -> None:
    """Add the live pipeline sub-commands: serve and status."""
    serve = commands.add_parser("serve", help="run the sampler or NER daemon of the live pipeline until stopped")
    serve.add_argument("daemon", choices=["sampler", "ner"], help="sampler: inbox/ to studies/; ner: entities of sampled studies")
    serve.add_argument("--root", type=Path, help="data root with inbox/ and studies/ (default: $MEDSYN_XAI_ROOT, else pipeline.root)")
    serve.add_argument("--config", type=Path, help="settings file (TOML) (default: $MEDSYN_XAI_CONFIG)")

    status = commands.add_parser("status", help="count prompts and studies of the live pipeline")
    status.add_argument("--root", type=Path, help="data root with inbox/ and studies/ (default: $MEDSYN_XAI_ROOT, else pipeline.root)")
    status.add_argument("--json", action="store_true", help="print the counts as JSON")


def _serve(args: argparse.Namespace) -> int:
    from medsyn_xai.config import ConfigError
    from medsyn_xai.pipeline.daemons import load_daemon_inputs, run_daemon

    try:
        settings, root = load_daemon_inputs(root=args.root, config=args.config)
    except ConfigError as error:
        raise UsageError(str(error)) from None
    return run_daemon(args.daemon, settings, root)


def _status(args: argparse.Namespace) -> int:
    from medsyn_xai.config import ConfigError
    from medsyn_xai.pipeline.daemons import format_status, load_daemon_inputs, pipeline_status

    try:
        settings, root = load_daemon_inputs(root=args.root)
    except ConfigError as error:
        raise UsageError(str(error)) from None
    if not root.is_dir():
        raise UsageError(f"data root '{root}' not found: pass --root DIR or set MEDSYN_XAI_ROOT")
    status = pipeline_status(root, lease_seconds=settings.pipeline.lease_seconds)
    if args.json:
        print(json.dumps({"root": str(root), **status}, indent=2))
    else:
        print(f"root: {root}")
        print(format_status(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
