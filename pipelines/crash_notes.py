"""Naming the file that crashed the decoder, on the next start.

DALI's CPU decoder (nvImageCodec, DALI 2.4) sometimes dies with a segmentation fault on a
truncated or non-image file instead of raising: no Python code runs after that, so the error
cannot name the file. The loader therefore keeps a small note of the files it has handed to the
decoder and may not have received back (the next few batches and the prefetch window),
rewritten every few batches (pipelines/dali.py: NOTE_EVERY) and removed when the epoch ends or
fails cleanly. A note still there at start-up means the last run died while decoding those
files; `check_crash_note` inspects them and names the culprit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DataError
from .verify import FATAL, check_file


def note_in_flight(note: Path | None, files) -> None:
    if note is not None:
        replace_note(note, [str(f) for f in files])


def replace_note(note: Path, content) -> None:
    """`content` as JSON in `note`, renamed into place: a crash mid-write leaves the previous
    note whole. Not fsynced: a note rewritten every batch only has to outlive a crashed process
    (the page cache does); pipelines may not import dist_free.atomic."""
    tmp = note.with_name(note.name + ".tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, note)


def clear_note(note: Path | None) -> None:
    if note is not None:
        note.unlink(missing_ok=True)


def read_note(note: Path, unreadable):
    """The note's JSON; `unreadable` if it is not valid JSON; None if there is no note."""
    if not note.is_file():
        return None
    try:
        return json.loads(note.read_text())
    except ValueError:
        return unreadable


def check_crash_note(note: Path) -> None:
    """Raise DataError naming the bad files if the previous run died while decoding them."""
    files = read_note(note, [])
    if files is None:
        return
    bad = [p for p in map(check_file, files) if p is not None and p.kind in FATAL]
    if not bad:
        clear_note(note)       # the crash had another cause: nothing to blame on the data
        return
    raise DataError(
        "the previous run died while decoding these files, and they are damaged: "
        + "; ".join(str(p) for p in bad)
        + ". Remove or replace them (`python -m dist_free.data verify ROOT` lists every bad file), "
        f"then start again. (Noted in {note}.)")
