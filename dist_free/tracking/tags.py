"""Run tags: what a run ran on and from (commit, devices, versions, the launch command)."""

from __future__ import annotations

import socket

from dist_free import environment


def environment_tags(world_size: int) -> dict[str, str]:
    commit, dirty = environment.git_commit()
    v = environment.versions()
    return {
        "mlflow.source.git.commit": commit,
        "git.dirty": "unknown" if dirty is None else str(dirty).lower(),
        "world_size": str(world_size), "devices": environment.device_names(),
        "host": socket.gethostname(),
        **{f"version.{name}": str(value if value is not None else "none")
           for name, value in v.items()},
        "launch.command": environment.launch_command(),
    }
