"""The tracking URI: where it comes from, and the checks that keep credentials out of it.

A URI ends up in logs, the WAL header and MLflow's own error messages, so a password inside it
would be written down in many places. MLflow reads credentials from the environment instead:
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for a tracking
server; a database URI takes its password from the driver's own mechanism (e.g. PGPASSWORD or
~/.pgpass for PostgreSQL).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit


class TrackingConfigError(ValueError):
    """The tracking configuration (URI, environment) is unusable; the message says why."""


def resolve_uri(uri: str | None) -> str:
    """The argument, else MLFLOW_TRACKING_URI, else the embedded store ./mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_uri(uri: str | None) -> None:
    """Raise TrackingConfigError if `uri` carries credentials (user:password@, or any user@
    for http(s), where a bare user part is a token). None and credential-free URIs pass."""
    if not uri:
        return
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise TrackingConfigError(f"tracking URI is not a valid URI ({exc})") from None
    if "@" not in parts.netloc:
        return
    userinfo, host = parts.netloc.rsplit("@", 1)
    if ":" not in userinfo and parts.scheme not in ("http", "https"):
        return  # a database user name alone is not a secret
    shown = f"{parts.scheme}://***@{host}"  # never echo the secret itself
    raise TrackingConfigError(
        f"tracking URI {shown} contains credentials; remove them and set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
        "instead (for a database URI, the driver's own, e.g. PGPASSWORD or ~/.pgpass)")


def bound_http_retries(uri: str) -> None:
    """Cap MLflow's HTTP retries and timeout for `uri` unless the user set them.

    MLflow's defaults (7 retries with exponential backoff, 120 s timeout) would hold one
    request for minutes; the tracker and `replay` retry by themselves, between items.
    """
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
