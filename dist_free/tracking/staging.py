"""Staged artifacts: hard links taken when an artifact is logged, one folder per tracker session.

    RUN_DIR/.mlflow_staging/<session id>/<n>/<file or folder name>

A hard link freezes a file as it is when logged (the trainer replaces checkpoints by rename)
without copying it, and keeps it for the WAL if the upload has to wait; where linking fails
(another file system) the file is copied. Once an item is uploaded only its own <n> folder is
removed, so two sessions in one run directory (a restart) never delete each other's files.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

STAGING_DIR = ".mlflow_staging"
log = logging.getLogger("dist_free.tracking")


def stage(run_dir: Path, sid: str, n: int, src: Path) -> Path | None:
    """Freeze file or folder `src` as RUN_DIR/.mlflow_staging/<sid>/<n>/<name>; the staged path
    relative to RUN_DIR, or None if `src` is neither or could not be staged."""
    folder = Path(run_dir) / STAGING_DIR / sid / f"{n:06d}"
    dest = folder / src.name
    try:
        if src.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            _link_or_copy(src, dest)
        elif src.is_dir():
            _stage_tree(src, dest)
        else:
            return None
    except OSError as exc:
        log.warning("could not stage %s for MLflow (%s); uploading the live file", src, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return dest.relative_to(run_dir)


def _stage_tree(src: Path, dest: Path) -> None:
    for root, _dirs, files in os.walk(src):
        target = dest / Path(root).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            _link_or_copy(Path(root) / name, target / name)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        tmp = dest.with_name(f".{dest.name}.tmp")  # a half copy must never look staged
        shutil.copy2(src, tmp)
        os.replace(tmp, dest)


def remove_staged(run_dir: Path, staged: str) -> None:
    """Delete the staging folder of one uploaded item, and only if that is what it is: the path
    comes from a file that could have been edited, and rmtree must never reach anything else."""
    folder = (Path(run_dir) / staged).parent
    root = (Path(run_dir) / STAGING_DIR).resolve()
    if folder.resolve().parent.parent != root or folder.is_symlink():
        log.warning("not removing %s after upload: not a staging folder of %s", folder, root)
        return
    shutil.rmtree(folder, ignore_errors=True)


def remove_session(run_dir: Path, sid: str) -> None:
    """Remove the session's staging folder if nothing is left in it."""
    try:
        os.rmdir(Path(run_dir) / STAGING_DIR / sid)
    except OSError:  # absent, or holds items still waiting: both fine
        pass
