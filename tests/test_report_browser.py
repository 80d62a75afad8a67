"""The HTML report renders its plots in a real browser (headless Chromium)."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from nestedtrain.cli import main
from nestedtrain.engine.config import load_config
from nestedtrain.engine.trainer import train

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)

pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no headless browser: install the Debian package `chromium` to run this test",
)

# Appended to a copy of the report: once every image has loaded (or failed), write what the
# browser decoded of each into the DOM, which --dump-dom then prints.
CHECK_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {alt: img.alt, complete: img.complete, width: img.naturalWidth,
            height: img.naturalHeight};
  });
  var out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify(images);
  document.body.appendChild(out);
});
</script>
"""


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("browser") / "run"
        cfg = load_config(
            None,
            [
                "model.name=resnet20",
                "method=st",
                "epochs=2",
                "batch_size=64",
                "device=cpu",
                "data.train_subset=256",
                "data.calib_images=256",
                "eval.subnets=sample:3",
                "analysis.kl_drift_every=1",
                "analysis.kl_drift_subnets=sample:4",
            ],
        )
        train(cfg, run, progress=False)
        assert main(["analyze", "subnets", str(run)]) == 0
        assert main(["analyze", "destruct", str(run), "--k", "1,2", "--permute-k", "1"]) == 0
        assert main(["analyze", "erf", str(run), "--input-size", "16", "--images", "8"]) == 0
        assert main(["report", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run / "report.html"


def test_every_plot_renders_in_headless_chromium(report, tmp_path):
    page = report.read_text()
    expected = [png_size(base64.b64decode(uri)) for uri in re.findall(r'base64,([^"]+)"', page)]
    assert len(expected) == 5  # training curves, KL drift, sub-networks, destruction, ERF
    probe = tmp_path / "report-check.html"
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    command = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r'<pre id="image-check">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the check script did not run; browser said: {done.stderr[-2000:]}"
    images = json.loads(html.unescape(match.group(1)))
    assert len(images) == len(expected)
    for image, (width, height) in zip(images, expected):
        assert image["complete"], image
        assert (image["width"], image["height"]) == (width, height), image
