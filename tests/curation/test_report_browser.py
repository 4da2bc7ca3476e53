"""The build report as a person sees it: report/index.html rendered by headless Chromium (the distribution's
package; .ci/setup installs it). The DOM after load says every plot image loaded; the screenshot is not blank and
shows the plots' own colours."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from build_fixtures import write_staged_build
from PIL import Image

from curation.index import IndexConfig, build_index
from curation.report import PLOTS, write_report
from curation.reshard import ShardConfig, reshard

# Reports the load state of every <img> into the DOM, which --dump-dom prints after the page's load event.
PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.setAttribute("data-loaded", String(img.complete && img.naturalWidth > 0));
    img.setAttribute("data-natural-width", String(img.naturalWidth));
  }
});
</script>"""
HISTOGRAM_BLUE = (0x3B, 0x75, 0xAF)  # curation.report's bar colour
SUCCESS_GREEN = (0x4C, 0x9A, 0x2A)
HEATMAP_ZERO = (0x44, 0x01, 0x54)  # viridis at 0: class pairs never seen together


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("Chromium is not installed: run `bash .ci/setup` (it installs the distribution's package)")
    return found


def _run_chromium(*args: str) -> str:
    # --no-sandbox: CI and this project's machines run tests as root, where Chromium's sandbox cannot start.
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--allow-file-access-from-files", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build")
    write_staged_build(root)
    build_index(root, IndexConfig())
    reshard(root, ShardConfig(samples_per_shard=8))
    return write_report(root)


def test_plots_are_present_and_load_in_the_browser(report):
    probe = report.parent / "probe.html"  # a copy with the probe script; the report itself stays as written
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _run_chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    images = re.findall(r"<img [^>]*>", dom)
    sources = sorted(re.search(r"src=\"([^\"]+)\"", img).group(1) for img in images)
    assert sources == sorted(PLOTS)  # all three plots are on the page
    for img in images:
        assert 'data-loaded="true"' in img, img
        assert int(re.search(r'data-natural-width="(\d+)"', img).group(1)) > 300, img


def _has_colour(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 6) -> int:
    return int((np.abs(pixels.astype(int) - np.array(colour)).max(axis=-1) <= tolerance).sum())


def test_screenshot_shows_the_plots(report, tmp_path):
    shot = tmp_path / "report.png"
    _run_chromium("--window-size=1400,2600", "--virtual-time-budget=10000", f"--screenshot={shot}", report.as_uri())
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (2600, 1400)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # not a blank page
    assert _has_colour(pixels, HEATMAP_ZERO) > 5000       # the co-occurrence heatmap's cells were drawn
    assert _has_colour(pixels, HISTOGRAM_BLUE) > 500     # the class histogram's bars were drawn
    assert _has_colour(pixels, SUCCESS_GREEN) > 500      # the download outcomes' success bar
    shutil.copy(shot, report.parent / "screenshot.png")  # kept next to the report for a person to look at
