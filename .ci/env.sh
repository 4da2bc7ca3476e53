# Environment shared by set-up, the demo and the tests: offline, no telemetry, state kept inside the repo.
CC4M_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CC4M_ROOT
export NO_ALBUMENTATIONS_UPDATE=1            # albumentations asks the package index for updates on every import
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME="${PREFECT_HOME:-$CC4M_ROOT/.prefect-home}"
export PYTHONUNBUFFERED=1
export OMP_WAIT_POLICY=PASSIVE           # busy-waiting OpenMP threads slow torch ~10x when the 2 cores are shared
