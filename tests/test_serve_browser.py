"""serve's status page in a real headless browser (Debian's Chromium, which the
Makefile's `browser` step installs): it loads, and shows the running deployment."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, Booted
from hf_models import make_hf_dir

sys.path.insert(0, str(ROOT / "bench"))
from serveboot import ServeProcess  # noqa: E402

from userland.serve import deploy  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `make browser` installs Debian's "
                    "(apt-get install chromium), which failed or was not run on this machine")
def test_status_page_in_chromium(tmp_path):
    src = make_hf_dir(tmp_path / "llama", "llama", seed=2)
    with Booted() as b:
        with b.connect(uid=0) as osh:
            osh.import_model(src, "/models/tiny")
            deploy(osh, "/models/tiny", "pagedemo", min=1, max=2, gpu_mem=4 << 20)
        with ServeProcess(b.root, ("--uid", "0")) as s:
            s.wait_running("pagedemo", timeout=60)
            with tempfile.TemporaryDirectory(prefix="llmos-chromium-") as profile:
                out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                                      "--dump-dom", s.url + "/"],
                                     capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    assert "<title>llmos serve</title>" in dom
    # the deployments table, as the browser parsed it, has the running deployment
    table = dom.split('id="deployments"', 1)[1].split("</table>", 1)[0]
    assert "pagedemo" in table and "/models/tiny" in table and "1/1" in table
