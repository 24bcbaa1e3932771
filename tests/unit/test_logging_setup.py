"""Every log line of the API is one JSON object, libraries with handlers of their own included."""

from __future__ import annotations

import logging
import subprocess
import sys

import orjson
import pytest

from serving.config import load_settings
from serving.logging import configure_logging


def _lines(err: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in err.splitlines() if line.strip()]


def test_pymilvus_records_are_json_lines_and_its_per_call_errors_are_quiet_unless_debugging(
        capsys: pytest.CaptureFixture[str]) -> None:
    import pymilvus  # noqa: F401 (installs its own handlers on import)

    configure_logging(load_settings(observability={"log_level": "INFO"}))
    logging.getLogger("pymilvus.decorators").error("RPC error: [search] timeout\nTraceback:\n  ...")
    logging.getLogger("serving.candidates").warning("candidate_source_skipped source=ann reason=timeout")
    lines = _lines(capsys.readouterr().err)  # every line parses as JSON
    assert [line["event"] for line in lines] == ["candidate_source_skipped"]

    configure_logging(load_settings(observability={"log_level": "DEBUG"}))
    logging.getLogger("pymilvus.decorators").error("RPC error: [search] timeout\nTraceback:\n  ...")
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0]["logger"] == "pymilvus.decorators" and lines[0]["level"] == "error"
    configure_logging(load_settings())


def test_pymilvus_imported_after_logging_is_configured_still_logs_through_us() -> None:
    """The API's order: logging first, pymilvus when the recommender is built (its import re-installs its handlers)."""
    script = """
import logging
from serving.config import load_settings
from serving.logging import configure_logging
configure_logging(load_settings(observability={"log_level": "INFO"}))
import infra.milvus  # imports pymilvus
logging.getLogger("pymilvus.decorators").error("RPC error: [search] Retry timeout: 0.08s\\nTraceback:\\n  ...")
logging.getLogger("pymilvus.milvus_client").warning("milvus_client_warning")
logging.getLogger("serving.candidates").warning("candidate_source_skipped source=ann reason=timeout")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [line["event"] for line in _lines(done.stderr)] == ["candidate_source_skipped"]
