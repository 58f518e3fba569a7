"""What the tracker could not deliver: written to the run directory at exit, replayed later.

`RUN_DIR/mlflow_unsent.jsonl` holds one JSON object per line: first the run (URI, experiment,
run id or null when the run was never created), then the items in the order they were logged.
Replaying is safe to repeat: MLflow's SQL stores ignore a metric identical to one already logged
(same key, value, step and timestamp, which the file keeps), params skip known keys, tags and
artifacts overwrite.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mlflow import MlflowClient

from dist_free.tracking.sender import RunTarget, open_run, send

UNSENT_FILE = "mlflow_unsent.jsonl"
UNSENT_MODELS = "mlflow_unsent_models"
log = logging.getLogger("dist_free.tracking")


def replay_command(run_dir: Path) -> str:
    return f"python -m dist_free.tracking replay {run_dir} [--uri URI]"


def dump(run_dir: Path, target: RunTarget, items: list[dict]) -> Path:
    """Append the run header and `items` to the unsent file; models are saved beside it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / UNSENT_FILE
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(target.describe()) + "\n")
        for n, item in enumerate(items):
            f.write(json.dumps(_jsonable(run_dir, item, n)) + "\n")
    return path


def _jsonable(run_dir: Path, item: dict, n: int) -> dict:
    if item["kind"] != "model":
        return item
    out = {k: v for k, v in item.items() if k not in ("model", "input_example")}
    if "model" in item:  # a live module: save it with MLflow's own format so replay can load it
        import mlflow.pytorch

        saved = run_dir / UNSENT_MODELS / f"{n}_{item['name']}"
        if saved.exists():
            import shutil
            shutil.rmtree(saved)
        mlflow.pytorch.save_model(item["model"], str(saved), serialization_format="pickle",
                                  pip_requirements=mlflow.pytorch.get_default_pip_requirements())
        out["saved_path"] = str(saved)
    return out


def load(path: Path) -> list[tuple[dict, list[dict]]]:
    """Parse the unsent file into (run header, items) groups, one per tracker session."""
    groups: list[tuple[dict, list[dict]]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from exc
            if obj.get("kind") == "run":
                groups.append((obj, []))
            elif not groups:
                raise ValueError(f"{path}:{lineno}: item before any run header")
            else:
                groups[-1][1].append(obj)
    return groups


def replay(run_dir: Path, uri: str | None = None) -> int:
    """Send everything in RUN_DIR's unsent file; rewrite it with what still failed.

    Returns the number of items that could not be sent (0 means the file was consumed).
    """
    path = Path(run_dir) / UNSENT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {UNSENT_FILE} in {run_dir}: nothing to replay")
    left: list[tuple[RunTarget, list[dict]]] = []
    for header, items in load(path):
        target = RunTarget(uri=uri or header["uri"], experiment=header["experiment"],
                           run_name=header["run_name"], start_ms=header["start_ms"],
                           artifact_location=header.get("artifact_location"),
                           run_id=header.get("run_id"))
        failed = _replay_group(target, items)
        if failed:
            left.append((target, failed))
    path.unlink()
    for target, items in left:
        dump(Path(run_dir), target, items)
    return sum(len(items) for _, items in left)


def _replay_group(target: RunTarget, items: list[dict]) -> list[dict]:
    client = MlflowClient(target.uri)
    try:
        open_run(client, target)
    except Exception as exc:  # noqa: BLE001 - reported, and every item is kept for next time
        log.error("cannot open the MLflow run at %s: %s", target.uri, exc)
        return items
    failed = []
    for item in items:
        try:
            send(client, target, item)
        except Exception as exc:  # noqa: BLE001 - one bad item must not hold back the rest
            log.error("replay of a %s item failed: %s", item["kind"], exc)
            failed.append(item)
    log.info("replayed %d of %d items into MLflow run %s", len(items) - len(failed),
             len(items), target.run_id)
    return failed
