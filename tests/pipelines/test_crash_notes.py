"""The decoder's in-flight note: how a crash that no Python code survives still names the file."""

import json
import shutil

import pytest

from pipelines import DataError, build_loader
from pipelines.crash_notes import check_crash_note
from pipelines.dali import NOTE_EVERY, PREFETCH


def test_a_note_left_by_a_crash_names_the_damaged_file(demo_root, tmp_path):
    good = sorted((demo_root / "train" / "1").iterdir())[:3]
    bad = tmp_path / "0001.JPEG"
    bad.write_bytes(good[0].read_bytes()[:200])
    note = tmp_path / "note.json"
    note.write_text(json.dumps([str(p) for p in [*good, bad]]))
    with pytest.raises(DataError, match=f"died while decoding.*{bad}"):
        check_crash_note(note)
    assert note.exists()                      # still blamed until the file is fixed
    shutil.copy(good[0], bad)
    check_crash_note(note)                    # fixed: nothing to blame, note cleared
    assert not note.exists()


def test_the_loaders_note_lists_its_prefetch_window_until_the_epoch_ends(demo_root, tmp_path):
    note = tmp_path / "notes" / "note.json"
    loader = build_loader("dali-cpu", demo_root, "train", batch_size=64, image_size=32,
                          val_resize=36, min_area=0.35, crash_note=note)
    batches = iter(loader)
    next(batches)
    in_flight = json.loads(note.read_text())
    assert 0 < len(in_flight) <= (NOTE_EVERY + PREFETCH + 2) * 64
    assert all(p.endswith(".JPEG") for p in in_flight)
    for _ in batches:
        pass
    assert not note.exists()


def test_a_note_left_by_a_crashed_run_stops_the_next_loader_naming_the_file(demo_root, tmp_path):
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    note = tmp_path / "note.json"
    note.write_text(json.dumps([str(bad)]))
    with pytest.raises(DataError, match="bad.JPEG"):
        build_loader("dali-cpu", demo_root, "val", batch_size=8, image_size=32, val_resize=36,
                     crash_note=note)
