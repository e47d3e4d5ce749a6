"""The start-up error report: a private file per failure, never written through a planted link, the newest kept."""

from __future__ import annotations

import io
import stat
import sys

import pytest

from masksup_med.errors import ConfigError
from masksup_med.run import error_report


def _failure() -> tuple:
    try:
        raise RuntimeError("Failed to evaluate ConfigExpression") from ConfigError("batch_size must be >= 1")
    except RuntimeError:
        return sys.exc_info()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKSUP_MED_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _report() -> str:
    stream = io.StringIO()
    assert error_report.report(*_failure(), stream=stream)
    return stream.getvalue()


def test_the_report_is_private_and_ends_with_the_message(cache):
    text = _report()
    assert text.rstrip().splitlines()[-1] == "error: batch_size must be >= 1"
    (saved,) = (cache / "error-reports").iterdir()
    assert f"full traceback in {saved};" in text
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert stat.S_IMODE(saved.parent.stat().st_mode) == 0o700
    assert "ConfigError" in saved.read_text()


def test_a_link_planted_at_the_report_name_is_left_alone(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(error_report.secrets, "token_hex", lambda n: "guessed")
    monkeypatch.setattr(error_report.time, "strftime", lambda fmt: "20260101-000000")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = cache / "error-reports"
    folder.mkdir(parents=True, mode=0o700)
    name = f"masksup-med-error-20260101-000000-{error_report.os.getpid()}-guessed.log"
    (folder / name).symlink_to(victim)
    text = _report()
    assert "full traceback not saved" in text
    assert victim.read_text() == "precious"
    assert (folder / name).is_symlink()


def test_a_linked_report_folder_is_not_used(cache, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache.mkdir()
    (cache / "error-reports").symlink_to(elsewhere, target_is_directory=True)
    assert "full traceback not saved" in _report()
    assert list(elsewhere.iterdir()) == []


def test_only_the_newest_reports_are_kept(cache, monkeypatch):
    monkeypatch.setattr(error_report, "KEEP_REPORTS", 3)
    for _ in range(5):
        _report()
    assert len(list((cache / "error-reports").glob("masksup-med-error-*.log"))) == 3
