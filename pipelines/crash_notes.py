"""Naming the file that crashed the decoder, on the next start.

DALI's CPU decoder (nvImageCodec, DALI 2.4) sometimes dies with a segmentation fault on a
truncated or non-image file instead of raising: no Python code runs after that, so the error
cannot name the file. The loader therefore keeps a small note of the files it has handed to the
decoder and not yet received back (the prefetch window), replaced at every batch and removed when
the epoch ends or fails cleanly. A note still there at start-up means the last run died while
decoding those files; `check_crash_note` inspects them and names the culprit.
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


def record_data_error(note: Path, message: str) -> None:
    """Remember a data error that ended this attempt, for the next attempt of the same job.

    A damaged file is deterministic: torchrun's --max-restarts would meet it again after the same
    minutes of training, once per restart. The note is keyed by torchrun's job id
    (TORCHELASTIC_RUN_ID), so a restart of the same job stops at once, while a new job (started
    after the data was fixed) goes ahead.
    """
    note.parent.mkdir(parents=True, exist_ok=True)
    replace_note(note, {"job": os.environ.get("TORCHELASTIC_RUN_ID"), "error": message})


def check_data_error(note: Path) -> None:
    """Raise the recorded error if an earlier attempt of this same torchrun job stopped on it."""
    recorded = read_note(note, {})
    if recorded is None:
        return
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job is None or recorded.get("job") != job:
        clear_note(note)       # a new job: the data may have been fixed since
        return
    raise DataError(f"an earlier attempt of this job stopped on a data error; restarting would "
                    f"only meet it again: {recorded.get('error')}. Fix the data, then start a new "
                    f"job. (Noted in {note}.)")
