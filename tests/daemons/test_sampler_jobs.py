"""One sampler job at a time, in-process, with a stand-in generator: idempotency and failures."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsyn_xai.config import PipelineSettings, Settings
from medsyn_xai.pipeline.daemons import SamplerDaemon
from medsyn_xai.pipeline.generate import GenerationRequest
from medsyn_xai.store import SampledStudy, StudyStore, list_studies, write_study

REPORT = "Spiculated nodule in the right upper lobe."


class StandInGenerator:
    """Writes a tiny valid study the way StudyGenerator.generate does, or raises ``error``."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[str] = []

    def generate(self, request, root, *, overwrite=False, progress=None, should_stop=None, extra_attrs=None):
        self.calls.append(request.study_id)
        if self.error is not None:
            raise self.error
        tokens = [{"index": 0, "text": "nodule", "start": 12, "end": 18, "special": False}]
        study = SampledStudy(
            study_id=request.study_id,
            prompt=request.prompt,
            ct=np.zeros((2, 4, 4), dtype=np.int16),
            masks={},
            tokens=tokens,
            saliency=np.ones((1, 1, 2, 2), dtype=np.float32),
            spacing_mm=(5.0, 6.0, 6.0),
            attrs={"seed": 0, "sampler": {}, "model": {"name": "stand-in"}, "text_encoder": {}, **(extra_attrs or {})},
        )
        return write_study(root, study, overwrite=overwrite)


def make_daemon(tmp_path: Path, generator: StandInGenerator) -> SamplerDaemon:
    settings = Settings(pipeline=PipelineSettings(worker="test-worker", lease_seconds=30))
    daemon = SamplerDaemon(settings, tmp_path, generator=generator)
    daemon.queue.prepare()
    return daemon


def test_prompt_becomes_study_with_source(tmp_path):
    generator = StandInGenerator()
    daemon = make_daemon(tmp_path, generator)
    (daemon.queue.inbox / "case-1.txt").write_text(REPORT)
    assert daemon.process(daemon.queue.inbox / "case-1.txt") == "sampled"
    source = StudyStore.open(tmp_path / "studies" / "case-1.zarr").attrs["source"]
    assert source["file"] == "case-1.txt"
    assert source["worker"] == "test-worker"
    assert len(source["sha256"]) == 64
    assert (daemon.queue.done_dir / "case-1.txt").is_file()


def test_returned_claim_of_finished_job_moves_to_done(tmp_path):
    generator = StandInGenerator()
    daemon = make_daemon(tmp_path, generator)
    prompt = daemon.queue.inbox / "case-2.txt"
    prompt.write_text(REPORT)

    # A worker wrote the study and died before moving the prompt: its claim came back.
    claim = daemon.queue.claim(prompt)
    generator.generate(
        GenerationRequest(prompt=REPORT, study_id="case-2"),
        tmp_path,
        extra_attrs={"source": daemon._source(claim)},
    )
    daemon.queue.release(claim)
    generator.calls.clear()

    assert daemon.process(prompt) == "already_sampled"
    assert generator.calls == []
    assert (daemon.queue.done_dir / "case-2.txt").is_file()
    assert list(daemon.queue.failed_dir.iterdir()) == []


def test_new_file_with_existing_study_id_is_duplicate(tmp_path):
    generator = StandInGenerator()
    daemon = make_daemon(tmp_path, generator)
    (daemon.queue.inbox / "case-3.txt").write_text(REPORT)
    assert daemon.process(daemon.queue.inbox / "case-3.txt") == "sampled"

    copy = daemon.queue.inbox / "case-3.txt"
    shutil.copy(daemon.queue.done_dir / "case-3.txt", copy)  # same name and bytes, new file
    assert daemon.process(copy) == "rejected"
    record = json.loads((daemon.queue.failed_dir / "case-3.txt.error.json").read_text())
    assert record["error"] == "duplicate_study"
    assert "case-3" in record["detail"]
    assert generator.calls == ["case-3"]


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), ValueError("bad grid")])
def test_generation_error_writes_failed_marker(tmp_path, error):
    daemon = make_daemon(tmp_path, StandInGenerator(error))
    (daemon.queue.inbox / "case-4.json").write_text(json.dumps({"prompt": REPORT, "steps": 2}))
    assert daemon.process(daemon.queue.inbox / "case-4.json") == "failed"
    marker = json.loads((tmp_path / "studies" / "case-4.failed").read_text())
    assert marker["stage"] == "sample"
    assert marker["error"] == type(error).__name__
    assert marker["detail"] == str(error)
    record = json.loads((daemon.queue.failed_dir / "case-4.json.error.json").read_text())
    assert record["error"] == "generation_failed"
    assert str(error) in record["detail"]
    assert list_studies(tmp_path) == {"case-4": {"failed"}}


def test_stop_request_returns_claim(tmp_path):
    from medsyn_xai.model.diffusion import SamplingInterrupted

    daemon = make_daemon(tmp_path, StandInGenerator(SamplingInterrupted("sampling stopped at step 3 of 50")))
    daemon.signals.stop.set()
    (daemon.queue.inbox / "case-5.txt").write_text(REPORT)
    assert daemon.process(daemon.queue.inbox / "case-5.txt") == "returned"
    assert (daemon.queue.inbox / "case-5.txt").read_text() == REPORT
    assert list_studies(tmp_path) == {}
