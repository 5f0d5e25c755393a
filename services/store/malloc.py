"""Keep glibc from returning large buffers to the kernel after every request.

A store moves megabyte-sized buffers all day. With glibc's defaults each one is a fresh `mmap`
(or a heap that is trimmed right after the free), so every buffer is page-faulted and zeroed
again: on these machines that was a third of the server's CPU on Put and halved redis-py's own
throughput. Raising the mmap and trim thresholds lets freed buffers be reused. The cost is that
up to `trim_bytes` of freed memory may stay in each of at most `arenas` malloc arenas.

Process-wide, so only entry points call it (`kvpool store serve`); libraries never do. The
same settings can be given to any process through the environment, e.g.
`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=67108864 MALLOC_ARENA_MAX=4`.
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_malloc(*, mmap_bytes: int = 32 << 20, trim_bytes: int = 64 << 20, arenas: int = 4) -> bool:
    """Apply the thresholds with `mallopt`; False (and no change) where glibc is not in use."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, mmap_bytes),
            (_M_TRIM_THRESHOLD, trim_bytes),
            (_M_ARENA_MAX, arenas),
        )
    )
    if not ok:
        log.warning("mallopt refused the buffer-reuse settings; continuing with defaults")
    return ok
