"""A resume must see the data its checkpoint was trained on, or be told to accept the change.

A changed `eval.holdout` lets held-out images be trained on and makes best.pt compare a figure
on one selection with a figure on another; a changed root, file list or class map silently
trains something else under the same run. Every checkpoint therefore records the data's
identity (`identity`), and a resume compares it with what the loaders see now (`check`): a
difference stops the run (CheckpointError: exit 2, the message names it) unless
`run.accept_data_changes` lists it, and then it is logged and tagged.

A CIFAR split (the resident loader) has no files of its own: its listing names images by index,
so its digest also covers the loader's `content`, the format and a SHA-256 of the split's pixels
and labels; a change of either is a "files" change. The format is recorded too.

Checkpoints written before the identity existed are compared on what their config and class map
say (root, holdout, classes); their file lists are unknown and not compared.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from dist_free.checkpoint import CheckpointError

log = logging.getLogger("dist_free.train")


def file_digest(*loaders) -> dict | None:
    """Count and SHA-256 of the sorted "file-name label" lines of the loaders' listings, and of
    their content digests where they have one (None for loaders without a listing, e.g.
    synthetic data without a root)."""
    loaders = [loader for loader in loaders if loader is not None]
    listings = [getattr(loader, "listing", None) for loader in loaders]
    if not listings or any(listing is None for listing in listings):
        return None
    lines = sorted(f"{f.name} {label}\n" for listing in listings
                   for f, label in zip(listing.files, listing.labels))
    contents = sorted({f"content {c['sha256']}\n" for loader in loaders
                       if (c := getattr(loader, "content", None))})
    digest = hashlib.sha256("".join(lines + contents).encode()).hexdigest()
    return {"images": len(lines), "sha256": digest}


def data_format(loader) -> str | None:
    """The CIFAR format a resident loader read; None for image folders and synthetic data."""
    content = getattr(loader, "content", None)
    return content["format"] if content else None


def identity(cfg, train_loader, val_loader, holdout_loader) -> dict:
    """What a checkpoint records of the data it was trained on. Training files are counted
    with the held-out ones: which of them are held out follows from `holdout` alone."""
    return {"root": str(Path(cfg.data.root).resolve()) if cfg.data.root else None,
            "holdout": cfg.eval.holdout, "format": data_format(train_loader),
            "train_files": file_digest(train_loader, holdout_loader),
            "val_files": file_digest(val_loader),
            "classes": dict(train_loader.class_to_idx)}


def saved_identity(state: dict) -> dict:
    if "data" in state:
        return state["data"]
    config = state.get("config") or {}
    root = (config.get("data") or {}).get("root")
    return {"root": str(Path(root).resolve()) if root else None,
            "holdout": (config.get("eval") or {}).get("holdout", 0),
            "classes": state.get("class_to_idx")}


def differences(saved: dict, now: dict) -> dict[str, str]:
    """{change name (as run.accept_data_changes spells it): what changed}."""
    found = {}
    if saved.get("root") != now["root"]:
        found["root"] = f"data.root was {saved.get('root')}, now {now['root']}"
    if saved.get("holdout") != now["holdout"]:
        found["holdout"] = (f"eval.holdout was {saved.get('holdout')} images, now {now['holdout']} "
                            "(held-out images would be trained on, or best.pt compared across "
                            "different selection sets)")
    files = [f"the {split} file list ({saved[key]['images']} images, now "
             f"{now[key]['images'] if now[key] else 'unknown'})"
             for key, split in (("train_files", "training"), ("val_files", "validation"))
             if saved.get(key) and saved[key] != now[key]]
    if "format" in saved and saved["format"] != now["format"]:
        files.append(f"the data format ({saved['format'] or 'image folders'}, now "
                     f"{now['format'] or 'image folders'})")
    if files:
        found["files"] = " and ".join(files) + " differ from the checkpoint's"
    old, new = saved.get("classes"), now["classes"]
    if old is not None and dict(old) != dict(new):
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        found["classes"] = (f"the class map differs ({len(changed)} classes, e.g. {changed[:3]}): "
                            "the model's outputs would mean other classes")
    return found


def check(state: dict, now: dict, accepted: tuple[str, ...], path: Path) -> dict[str, str]:
    """Raise CheckpointError for a data change not in `accepted`; return the accepted ones."""
    found = differences(saved_identity(state), now)
    refused = {k: v for k, v in found.items() if k not in accepted}
    if refused:
        raise CheckpointError(
            f"{path} was trained on other data: {'; '.join(refused.values())}. Resume on the "
            "data the run started with, start afresh under a new run.name, or accept the change "
            f"on purpose with run.accept_data_changes=[{','.join(refused)}]")
    for what in found.values():
        log.warning("resuming on changed data, accepted by run.accept_data_changes: %s", what)
    return found
