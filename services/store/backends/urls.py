"""Backend URLs as they may be shown: in logs, errors and stats, never with a password.

Its own module so that the backends and the package that picks them both import it, and neither
imports the other.
"""

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by `***`, safe for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
