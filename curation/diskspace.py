"""A full disk, said in one line: the download's processes stop at the first write that fails with ENOSPC (or a
quota's EDQUOT), and the build fails with the folder and its free space, instead of waiting on a download that
can no longer write anything. Also the estimate, before a download, of the space it will need."""
from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Below this much free space the download's writes (a staging image, a parquet buffer, img2dataset's feather shards)
# fail; the driver's watcher treats it as full even when the failing write was one img2dataset retries quietly.
NEARLY_FULL_BYTES = 4 * 1024 * 1024
# Expected bytes of one stored JPEG per pixel of image_size**2 (q95, 256 px: ~32 KB), and the copies a build keeps:
# the staging tar and the final shard.
STORED_BYTES_PER_PIXEL = 0.5
COPIES_PER_IMAGE = 2


class DiskFull(OSError):
    """A write of the build failed for want of space (or the disk it writes to is as good as full). An OSError with
    errno ENOSPC whose str() is the one line itself."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def free_bytes(folder: str | Path) -> int:
    """Free space, for an unprivileged user, on the disk holding `folder` (its nearest existing parent)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def disk_full(folder: str | Path, what: str = "") -> DiskFull:
    """The one-line error: which folder, how much space is left there."""
    detail = f" ({what})" if what else ""
    return DiskFull(f"download: no space left on the disk holding {folder}: {human(free_bytes(folder))} "
                                  f"free{detail}. Free space (or build on a larger disk) and rerun: finished shards "
                                  f"are kept")


@contextlib.contextmanager
def disk_full_as_one_line(folder: str | Path) -> Iterator[None]:
    """Turn an ENOSPC/EDQUOT anywhere in the block into DiskFull naming `folder` and its free space."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as err:
        if not is_disk_full(err):
            raise
        raise disk_full(folder, err.strerror or str(err)) from err


def expected_bytes(images: int, image_size: int) -> int:
    return int(images * image_size * image_size * STORED_BYTES_PER_PIXEL * COPIES_PER_IMAGE)


def warn_if_short(folder: str | Path, images: int, image_size: int) -> dict[str, int] | None:
    """Before a download: log a warning when the disk holding `folder` has less free space than `images` stored
    images are expected to take (staging and final shards). Returns the numbers when short."""
    need, free = expected_bytes(images, image_size), free_bytes(folder)
    if free >= need:
        return None
    log.warning("download: %d images at %d px are expected to need about %s (staging + shards), but the disk holding "
                "%s has %s free; the build will fail when it fills up", images, image_size, human(need), folder,
                human(free))
    return {"expected_bytes": need, "free_bytes": free}
