"""Reading files: every failure is one error naming the file and the fix."""

from pathlib import Path

import pytest

from offsite.errors import OffsiteError
from offsite.files import check_output_dir, read_json, read_text


def test_unreadable_file_is_named_with_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text("{}")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads chmod-000 files, so simulate the denial
    with pytest.raises(OffsiteError, match=r"manifest.json cannot be read \(permission denied\); make it readable"):
        read_json(path, "a bundle")


def test_non_utf8_text_names_the_flag_and_the_byte(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"ok \xe9")
    with pytest.raises(OffsiteError, match=r"--data .*notes.txt is not UTF-8 text \(byte 3\)"):
        read_text(path, "--data")


def test_output_inside_an_unwritable_directory_is_refused_before_work(tmp_path, monkeypatch):
    import offsite.files as files
    monkeypatch.setattr(files.os, "access", lambda path, mode: False)
    with pytest.raises(OffsiteError, match="cannot write into .* \\(permission denied\\)"):
        check_output_dir(tmp_path / "new" / "adapter", overwrite=False)
