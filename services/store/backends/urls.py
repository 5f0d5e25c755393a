"""Backend URLs as they may be shown: in logs, errors and stats, never with a password.

Its own module so that the backends and the package that picks them both import it, and neither
imports the other.
"""

from urllib.parse import urlsplit, urlunsplit

# A Redis Cluster's URLs: `redis+cluster://host:port[,host:port...]`.
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by `***`, safe for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    hosts = parts.netloc.rpartition("@")[2]  # as written: a cluster URL lists several
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))
