"""Headless Chromium for looking at a page as a person would: a screenshot of its first screen.

Used by `tests/test_view_browser.py` (skipped where no Chromium is installed) and `benchmarks/pictures.py`.
Install it with `apt-get install -y chromium` (Debian) or use any `chromium` / `google-chrome` on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium-like browser on PATH, else None."""
    return next((found for name in NAMES if (found := shutil.which(name))), None)


def screenshot(page: Path, target: Path, size: tuple[int, int] = (1280, 900), timeout: float = 180) -> bool:
    """Render `page` (a local HTML file) at `size` and save what the first screen shows as a PNG at
    `target`; False when no browser is installed."""
    browser = find_chromium()
    if browser is None:
        return False
    with tempfile.TemporaryDirectory(prefix="stencil-chromium-") as profile:
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                "--virtual-time-budget=5000",  # let every image load before the picture is taken
                f"--user-data-dir={profile}",
                f"--screenshot={target}",
                f"--window-size={size[0]},{size[1]}",
                Path(page).resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
    return target.is_file()
