"""What a person sees: a diverging watched run's dashboards in a real TensorBoard, opened
in headless Chromium (``demos/dashboard_screenshots.py`` does the same and keeps the
screenshots).  Checked through the page's DOM: every custom-scalars chart of the layout
is there and draws lines, both heatmap images load, and the console has no errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from browser import console_errors, headless_chromium, requires_chromium

DEMO = Path(__file__).resolve().parent.parent / "demos" / "dashboard_screenshots.py"


def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard_screenshots", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMAGES_LOADED = """
const found = [];
function walk(root) {
  for (const img of root.querySelectorAll('img')) {
    if ((img.src || '').includes('individualImage')) found.push([img.complete, img.naturalWidth]);
  }
  for (const el of root.querySelectorAll('*')) { if (el.shadowRoot) walk(el.shadowRoot); }
}
walk(document);
return found;
"""


@pytest.mark.slow
@requires_chromium
def test_dashboards_render_in_chromium(tmp_path: Path) -> None:
    from gradscope.dashboards import charts as ch

    shots = demo()
    history = shots.diverging_run(tmp_path / "logs")
    assert history["nonfinite"]["gradient"] or history["nonfinite"]["activation"]
    charts = sum(len(c) for c in ch.layout(("fp16",)).values())
    with shots.tensorboard(tmp_path / "logs") as url, headless_chromium(1400, 1800) as driver:
        shots.open_page(driver, url, "custom_scalars")
        assert shots.deep_count(driver, "tf-custom-scalar-multi-line-chart-card") == charts
        # the charts with data draw lines (Plottable renders each series as an SVG path)
        assert shots.wait_until(lambda: shots.deep_count(driver, "path.line") >= 10, 60)
        driver.save_screenshot(str(tmp_path / "custom_scalars.png"))
        shots.open_page(driver, url, "images")
        loaded = driver.execute_script(IMAGES_LOADED)
        assert len(loaded) == 2 and all(complete and width > 300 for complete, width in loaded), loaded
        driver.save_screenshot(str(tmp_path / "images.png"))
        assert console_errors(driver) == []
