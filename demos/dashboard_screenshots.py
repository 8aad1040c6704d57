"""What gradscope's TensorBoard dashboards look like to a person, in a real browser.

Trains a small diverging run with ``gradscope.watch(log_dir=...)`` (a 10-layer
ReLU MLP whose learning rate warms up to about ten times what it tolerates:
the gradients of the deep layers blow up, then NaN), starts TensorBoard on
127.0.0.1, opens its Custom Scalars, Time Series, Scalars and Images dashboards
in headless Chromium and saves a screenshot of each.  The screenshots stay out
of git (default directory: /tmp/gradscope-shots).

    python demos/dashboard_screenshots.py [OUT_DIR]

Needs Debian's chromium and chromium-driver and selenium (``tests/browser.py``).
``tests/test_tensorboard_browser.py`` runs the same and checks the page's DOM.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("/tmp/gradscope-shots")
STEPS = 120
PEAK_LR = 0.25
WARMUP = 60
WAIT_SECONDS = 90

# The dashboards, by URL fragment, and what each screenshot is for.
PAGES = {
    "custom_scalars": "the gradscope layout: loss and norm first, the worst layers per chart",
    "timeseries": "TensorBoard's default tab: tag groups in question order",
    "scalars": "the Scalars tab: one card per question",
    "images": "the layer x step heatmaps",
}


def diverging_run(log_dir: Path, steps: int = STEPS) -> dict[str, Any]:
    """Train until gradscope stops the run at the first NaN; returns the report's history."""
    import gradscope
    from gradscope.errors import GradscopeError
    from gradscope.training_demo import make_problem, warmup_sgd

    model, x, y = make_problem(0, width=48, hidden_layers=8)  # 10 Linear layers
    scope = gradscope.watch(model, log_dir=str(log_dir), on_finding=lambda finding: None)
    try:
        with scope:
            warmup_sgd(model, x, y, steps, lambda opt, loss: scope.step(opt, loss=loss), peak_lr=PEAK_LR, warmup=WARMUP)
    except GradscopeError:
        pass  # stopped at the first NaN, as it should
    return scope.report().run["history"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def tensorboard(log_dir: Path) -> Iterator[str]:
    """A TensorBoard server on 127.0.0.1 (a subprocess, always stopped); yields its URL."""
    exe = shutil.which("tensorboard")
    command = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    port = free_port()
    proc = subprocess.Popen(
        [*command, "--logdir", str(log_dir), "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited with code {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/data/plugin/custom_scalars/layout", timeout=5) as response:
                    if response.read().strip() not in (b"", b"{}"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensorboard did not serve the layout within {WAIT_SECONDS}s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# Polymer and Angular components keep their DOM in shadow roots: count matches in all of them.
DEEP_COUNT = """
const selector = arguments[0];
function count(root) {
  let n = root.querySelectorAll(selector).length;
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_ELEMENT, {
    acceptNode: (el) => el.namespaceURI === 'http://www.w3.org/2000/svg'
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  for (let el = walker.nextNode(); el; el = walker.nextNode()) { if (el.shadowRoot) n += count(el.shadowRoot); }
  return n;
}
return count(document);
"""

DEEP_TEXT = """
function text(root) {
  let out = '';
  for (const el of root.querySelectorAll('*')) {
    if (el.shadowRoot) out += ' ' + text(el.shadowRoot);
  }
  return (root.body ? root.body.innerText : (root.textContent || '')) + out;
}
return text(document);
"""


def deep_count(driver: Any, selector: str) -> int:
    return int(driver.execute_script(DEEP_COUNT, selector))


def deep_text(driver: Any) -> str:
    return str(driver.execute_script(DEEP_TEXT))


def wait_until(predicate: Any, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(2)
    return False


def open_page(driver: Any, url: str, page: str) -> None:
    """Open one dashboard and wait until its charts or images are drawn."""
    driver.set_script_timeout(120)
    driver.get(f"{url}/#{page}")
    if page == "images":
        wait_until(lambda: deep_count(driver, "img[src*='individualImage']") >= 2)
    else:
        wait_until(lambda: deep_count(driver, "svg, canvas") > 3, 90)
        time.sleep(8)
    time.sleep(4)  # the charts animate their first draw


def capture(url: str, out_dir: Path, driver: Any) -> dict[str, Path]:
    """A screenshot of each dashboard in PAGES; returns page -> PNG path."""
    shots = {}
    for page in PAGES:
        open_page(driver, url, page)
        path = out_dir / f"{page}.png"
        driver.save_screenshot(str(path))
        shots[page] = path
    return shots


def main(out_dir: Path = DEFAULT_OUT) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from browser import WHY_NO_BROWSER, console_errors, headless_chromium

    if WHY_NO_BROWSER:
        print(f"cannot take screenshots: {WHY_NO_BROWSER}", file=sys.stderr)
        return 2
    log_dir = out_dir / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = diverging_run(log_dir)
    bad = history["nonfinite"]["gradient"] + history["nonfinite"]["activation"]
    print(f"trained {history['steps'][-1] + 1} steps; non-finite cells (layer, column): {bad[:6]}")
    with tensorboard(log_dir) as url, headless_chromium(1400, 1800) as driver:
        shots = capture(url, out_dir, driver)
        errors = console_errors(driver)
    for page, path in shots.items():
        print(f"{path}: {PAGES[page]}")
    if errors:
        print("console errors:\n" + "\n".join(errors), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
