"""Specification of `verify`: every kind of bad file is found and named; a clean dataset passes."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dist_free.data import main
from helpers_data import write_coded_split, write_textured
from pipelines import DataError, scan
from pipelines import verify as v


def make_bad_files(root: Path) -> dict[str, Path]:
    """One file of each kind in ROOT/train/<class>/, next to the clean ones."""
    folder = root / "train" / "class0"
    bad = {
        v.WRONG_FORMAT: write_textured(folder / "png.JPEG", 30, 20, seed=1, fmt="PNG"),
        v.CMYK: write_textured(folder / "cmyk.JPEG", 30, 20, seed=2, mode="CMYK"),
        v.GRAYSCALE: write_textured(folder / "gray.JPEG", 30, 20, seed=3, mode="L"),
        v.NOT_IMAGE: folder / "notes.JPEG",
        v.TRUNCATED: write_textured(folder / "cut.JPEG", 64, 64, seed=4),
        v.EMPTY_CLASS: root / "train" / "zz_empty",
    }
    bad[v.NOT_IMAGE].write_text("this is not a picture\n")
    bad[v.TRUNCATED].write_bytes(bad[v.TRUNCATED].read_bytes()[:400])
    bad[v.EMPTY_CLASS].mkdir()
    (bad[v.EMPTY_CLASS] / "README.txt").write_text("not an image extension, so ignored\n")
    return bad


@pytest.fixture
def clean(tmp_path):
    write_coded_split(tmp_path, "train", [3, 2])
    write_coded_split(tmp_path, "val", [1, 1])
    return tmp_path


def test_clean_dataset_has_no_problems(clean):
    assert scan(clean, workers=1) == []
    assert main(["verify", str(clean), "--workers", "1"]) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_each_kind_of_bad_file_is_found_and_nothing_else(clean, workers):
    bad = make_bad_files(clean)
    found = {(p.kind, p.path) for p in scan(clean, workers=workers)}
    assert found == {(kind, path) for kind, path in bad.items()}


def test_a_jpeg_missing_only_its_end_marker_counts_as_truncated(clean):
    path = write_textured(clean / "val" / "class1" / "noeoi.JPEG", 40, 40, seed=5)
    path.write_bytes(path.read_bytes()[:-2])
    assert [(p.kind, p.path) for p in scan(clean, workers=1)] == [(v.TRUNCATED, path)]


def test_verify_cli_lists_files_and_exits_non_zero(clean, capsys):
    bad = make_bad_files(clean)
    assert main(["verify", str(clean), "--split", "train", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    for kind, path in bad.items():
        assert any(kind in line and str(path) in line for line in out.splitlines())


def test_verify_scans_only_the_splits_asked(clean):
    write_textured(clean / "val" / "class0" / "gray.JPEG", 20, 20, seed=6, mode="L")
    assert scan(clean, ("train",), workers=1) == []
    assert [p.kind for p in scan(clean, ("val",), workers=1)] == [v.GRAYSCALE]


def test_verify_of_a_missing_root_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "missing")
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_check_file_accepts_a_clean_rgb_jpeg(tmp_path):
    assert v.check_file(write_textured(tmp_path / "ok.JPEG", 33, 21, seed=7)) is None
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    assert v.check_file(tmp_path / "ok.png") is None  # PNG named .png is what it says it is
