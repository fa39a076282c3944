"""Logging set-up: JSON lines for structlog and stdlib loggers alike."""

import io
import json
import logging

import pytest
import structlog

from medsyn_xai.logs import configure_logging


def test_json_lines_for_structlog_and_stdlib():
    stream = io.StringIO()
    configure_logging("INFO", renderer="json", stream=stream)

    structlog.get_logger("medsyn_xai.test").bind(study_id="s1").info("study written", path="/x")
    logging.getLogger("some.library").warning("library says %s", "hello")
    logging.getLogger("some.library").debug("hidden below INFO")

    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(records) == 2
    assert records[0]["event"] == "study written"
    assert records[0]["study_id"] == "s1"
    assert records[0]["level"] == "info"
    assert "timestamp" in records[0]
    assert records[1]["event"] == "library says hello"
    assert records[1]["logger"] == "some.library"
    assert records[1]["level"] == "warning"


def test_exceptions_rendered_in_json():
    stream = io.StringIO()
    configure_logging("INFO", renderer="json", stream=stream)
    try:
        raise ValueError("bad value")
    except ValueError:
        structlog.get_logger("t").exception("job failed")
    record = json.loads(stream.getvalue().splitlines()[-1])
    assert "ValueError: bad value" in record["exception"]


def test_console_renderer_on_request():
    stream = io.StringIO()
    configure_logging("INFO", renderer="console", stream=stream)
    structlog.get_logger("t").info("hello", study_id="s2")
    output = stream.getvalue()
    assert "hello" in output
    assert "study_id" in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output.splitlines()[0])


def test_unknown_level_rejected():
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        configure_logging("LOUD", stream=io.StringIO())
