"""Specification of `verify`: every kind of bad file is found and named; a clean dataset passes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from helpers_data import bmp_claiming, jpeg_claiming, png_claiming, write_coded_split, write_textured
from PIL import Image, ImageFile

from dist_free.data import main
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
def test_verify_finds_exactly_the_bad_files(clean, workers):
    bad = make_bad_files(clean)
    found = {(p.kind, p.path) for p in scan(clean, workers=workers)}
    assert found == {(kind, path) for kind, path in bad.items()}


def test_a_jpeg_missing_only_its_end_marker_counts_as_truncated(clean):
    path = write_textured(clean / "val" / "class1" / "noeoi.JPEG", 40, 40, seed=5)
    path.write_bytes(path.read_bytes()[:-2])
    assert [(p.kind, p.path) for p in scan(clean, workers=1)] == [(v.TRUNCATED, path)]


def test_verify_cli_exits_1_listing_each_bad_file(clean, capsys):
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


# Headers that lie. Claims: 60000 x 60000 = 3.6 G pixels (Pillow itself raises over 2 x its
# limit); 10000 x 9000 = 90 M, just over the limit (Pillow only warns there, then would decode).
BOMBS = {
    "png-bomb": (png_claiming(60000, 60000), "its PNG header claims 60000 x 60000 = 3,600,000,000"),
    "jpeg-bomb": (jpeg_claiming(60000, 60000), "its JPEG header claims 60000 x 60000"),
    "png-over-limit": (png_claiming(10000, 9000), "claims 10000 x 9000 = 90,000,000 pixels"),
    "bmp-bomb": (bmp_claiming(60000, 60000), "Image size (3600000000 pixels)"),
    "bmp-over-limit": (bmp_claiming(10000, 9000), "Image size (90000000 pixels)"),
}
# Claims under the limit that the file's bytes cannot hold.
SHORT = {
    "png": (png_claiming(9000, 9000), "its PNG header claims 9000 x 9000 pixels, which need at "
                                      "least 235,473 bytes, but the file has 69"),
    "jpeg": (jpeg_claiming(9000, 9000), "its JPEG header claims 9000 x 9000 pixels, which need "
                                        "at least 9,940 bytes"),
}


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any pixel decode fail loudly: a refusal must come before it."""
    def load(self):
        raise AssertionError("decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize("name", BOMBS)
def test_a_bomb_is_refused_from_its_header_naming_the_claim(tmp_path, name, no_decoding, recwarn):
    data, claim = BOMBS[name]
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    problem = v.check_file(path)
    assert (problem.kind, problem.path) == (v.TOO_LARGE, path) and claim in problem.detail
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize("name", ["png-over-limit", "bmp-over-limit"])
def test_our_limit_holds_when_pillows_is_switched_off(tmp_path, name, monkeypatch, no_decoding):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = tmp_path / "big.png"
    path.write_bytes(BOMBS[name][0])
    problem = v.check_file(path)
    assert problem.kind == v.TOO_LARGE and "10000 x 9000 = 90,000,000 pixels" in problem.detail


@pytest.mark.parametrize("fmt", SHORT)
def test_a_claim_the_file_is_too_short_to_hold_is_truncated_before_decoding(tmp_path, fmt,
                                                                           no_decoding):
    data, detail = SHORT[fmt]
    path = tmp_path / f"short.{fmt}"
    path.write_bytes(data)
    problem = v.check_file(path)
    assert (problem.kind, problem.path) == (v.TRUNCATED, path) and detail in problem.detail


@pytest.mark.parametrize("mode, fmt", [("1", "PNG"), ("L", "PNG"), ("RGB", "PNG"),
                                       ("RGB", "JPEG")])
def test_the_size_bound_passes_the_most_compressible_real_images(tmp_path, mode, fmt):
    """Flat images compress best (a flat PNG comes within 10% of the bound): none is truncated."""
    path = tmp_path / f"flat.{fmt.lower()}"
    Image.new(mode, (3000, 2000)).save(path, fmt, optimize=True, quality=5)
    problem = v.check_file(path)
    assert problem is None or problem.kind == v.GRAYSCALE


class CountingFile(io.FileIO):
    """A file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        CountingFile.read_bytes += len(data)
        return data


def test_a_huge_file_failing_its_header_check_is_not_read(tmp_path, monkeypatch):
    path = tmp_path / "huge.JPEG"
    with open(path, "wb") as f:
        f.write(jpeg_claiming(60000, 60000))
        f.truncate(1 << 30)  # 1 GiB, sparse: costs nothing unless read
    monkeypatch.setattr(v, "open", lambda p, mode: CountingFile(p, "r"), raising=False)
    CountingFile.read_bytes = 0
    assert v.check_file(path).kind == v.TOO_LARGE
    assert CountingFile.read_bytes < 1024  # the markers up to the frame header


def test_verify_cli_names_a_bomb_with_the_size_it_claims(clean, capsys):
    path = clean / "val" / "class0" / "bomb.JPEG"
    path.write_bytes(jpeg_claiming(60000, 60000))
    assert main(["verify", str(clean), "--workers", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"too-large     {path}: its JPEG header claims 60000 x 60000 = "
                     "3,600,000,000 pixels, over the limit of 89,478,485; not decoded (a "
                     "decompression bomb or a corrupt header)"]
