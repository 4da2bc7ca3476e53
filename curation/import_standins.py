"""Stand-ins for packages img2dataset imports but cc4m's download processes never use.

img2dataset imports these at module level for things the download stage never does: webdataset (and through it
torch) for its webdataset writer, which `curation.download_worker.StagingSampleWriter` replaces; wandb for W&B
logging (enable_wandb is always False); albumentations for its resizer and bounding-box blurring (replaced, and
refused by DownloadConfig). Loading them cost ~2.8 s of CPU in the driver, in each worker and in img2dataset's
logger process: more than the image work of a 2,000-image round on two cores.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

UNUSED_BY_THE_DOWNLOAD = ("webdataset", "wandb", "albumentations")


class _Unloaded(ModuleType):
    """Stands in for a package img2dataset imports but the download processes never use: any use fails loudly."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{self.__name__}.{name}: {self.__name__} is not loaded in cc4m's download processes "
                             f"(curation.import_standins.UNUSED_BY_THE_DOWNLOAD); this img2dataset feature is not supported")


def leave_unused_packages_unloaded() -> None:
    """Only in the img2dataset driver and the processes it spawns (never in a process that may need them)."""
    for name in UNUSED_BY_THE_DOWNLOAD:
        sys.modules.setdefault(name, _Unloaded(name))
