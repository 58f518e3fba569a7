"""The tracking URI: where it comes from, and the checks that keep credentials out of it.

A URI ends up in logs, the WAL header and MLflow's own error messages, so a password inside it
(user:password@, or a query parameter such as ?password= or ?token=) would be written down in many
places. MLflow reads credentials from the environment instead:
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for a tracking
server; a database URI takes its password from the driver's own mechanism (e.g. PGPASSWORD or
~/.pgpass for PostgreSQL).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

# A query or fragment parameter carries a credential when its name, lowercased and cut down to
# letters and digits (X-Amz-Signature -> xamzsignature), contains one of SECRET_STEMS or is one of
# SECRET_NAMES. A value that is itself name=value pairs (an ODBC connection string, odbc_connect=
# ...;PWD=...) is read the same way. Paths (passfile, sslkey) and auth method names (require_auth)
# are settings, not secrets.
SECRET_STEMS = ("password", "passwd", "passphrase", "pwd", "secret", "token", "credential",
                "signature", "apikey", "accesskey", "privatekey")
SECRET_NAMES = frozenset({"key", "sig", "pass", "auth", "authorization", "jwt"})
USE_ENV = ("remove them and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
           "MLFLOW_TRACKING_TOKEN) instead (for a database URI, the driver's own, e.g. PGPASSWORD "
           "or ~/.pgpass)")


class TrackingConfigError(ValueError):
    """The tracking configuration (URI, environment) is unusable; the message says why."""


def resolve_uri(uri: str | None) -> str:
    """The argument, else MLFLOW_TRACKING_URI, else the embedded store ./mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_uri(uri: str | None) -> None:
    """Raise TrackingConfigError if `uri` carries credentials: user:password@ (or any user@ for
    http(s), where a bare user part is a token), or a query or fragment parameter named as a
    secret (see SECRET_STEMS). None and credential-free URIs pass. The message never holds the
    secret (shown_uri)."""
    if not uri:
        return
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise TrackingConfigError(f"tracking URI is not a valid URI ({exc})") from None
    # The user part as SQLAlchemy reads it: everything up to the last "@" after "//", which may
    # hold a "/", "?" or "#" that ends urlsplit's netloc early (postgresql://u:p/ss@host/db).
    authority = uri.split("//", 1)[1] if "//" in uri else ""
    if "@" in authority:
        userinfo = authority.rsplit("@", 1)[0]
        if ":" in userinfo or parts.scheme in ("http", "https"):   # a database user alone is no secret
            raise TrackingConfigError(f"tracking URI {shown_uri(uri)} contains credentials; "
                                      f"{USE_ENV}")
    term = (secret_parameter(parts.query) or secret_parameter(parts.fragment)
            or secret_parameter(path_parameters(parts.path)))
    if term:
        raise TrackingConfigError(f"tracking URI {shown_uri(uri)} carries credentials in a "
                                  f"query parameter (its name says {term!r}); {USE_ENV}")


def path_parameters(path: str) -> str:
    """RFC 3986 path parameters (/api;password=x/runs) as one query string: a server may read
    them as parameters, and they are printed wherever the path is."""
    return ";".join(seg.split(";", 1)[1] for seg in path.split("/") if ";" in seg)


def secret_parameter(text: str, nested: bool = True) -> str | None:
    """The SECRET_STEMS/SECRET_NAMES term that a parameter of query string `text` is named by
    (a term, never the name itself: a malformed name may hold the value), else None."""
    for name, value in parse_qsl(text.replace(";", "&"), keep_blank_values=True):
        plain = re.sub(r"[^a-z0-9]", "", name.lower())
        if plain in SECRET_NAMES:
            return plain
        term = next((stem for stem in SECRET_STEMS if stem in plain), None)
        if term is None and nested and "=" in value:
            term = secret_parameter(value, nested=False)
        if term:
            return term
    return None


def shown_uri(uri: str) -> str:
    """`uri` as it may be printed: the user part and every query and fragment value as ***."""
    try:
        urlsplit(uri)
    except ValueError:
        return "<not a valid URI>"
    scheme, slashes, authority = uri.partition("//")
    if slashes and "@" in authority:      # the user part up to the last "@", as check_uri reads it
        uri = scheme + slashes + "***@" + authority.rsplit("@", 1)[1]
    rest, hash_, fragment = uri.partition("#")
    head, mark, query = rest.partition("?")
    return _masked_path(head) + mark + _masked(query) + hash_ + _masked(fragment)


def _masked_path(head: str) -> str:
    """scheme://authority/path with every path parameter's value (;name=value) as ***."""
    scheme, slashes, rest = head.partition("//")
    if not slashes:
        scheme, rest = "", head
    authority, slash, path = rest.partition("/")
    path = re.sub(r";([^;/=]*)=[^;/]*", r";\1=***", path)
    return scheme + slashes + authority + slash + path


def redact(text: str, uri: str) -> str:
    """`text` (an MLflow error, which quotes the URI or just its path and query) with `uri`, its
    user part and its query string masked as shown_uri masks them."""
    text = text.replace(uri, shown_uri(uri))
    query = uri.partition("#")[0].partition("?")[2]
    if query:
        text = text.replace(query, _masked(query))
    try:
        netloc = urlsplit(uri).netloc
    except ValueError:
        return text
    return text.replace(netloc.rsplit("@", 1)[0] + "@", "***@") if "@" in netloc else text


def _masked(query: str) -> str:
    items = [item for item in re.split(r"[&;]", query) if item]
    return "&".join(f"{item.split('=', 1)[0]}=***" if "=" in item else "***" for item in items)


def bound_http_retries(uri: str) -> None:
    """Cap MLflow's HTTP retries and timeout for `uri` unless the user set them.

    MLflow's defaults (7 retries with exponential backoff, 120 s timeout) would hold one
    request for minutes; the tracker and `replay` retry by themselves, between items.
    """
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
