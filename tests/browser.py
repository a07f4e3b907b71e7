"""A real headless browser for the HTML pages' tests: render a page to a PNG and read it back as pixels.

Chromium (Debian's `chromium`, or Chrome) draws the page as a user would see it; the tests then check pixels
that only a rendered page has (the plots' line colours, a dashed marker), so an SVG that does not render, or
a page that comes out blank, fails. Without a browser on the machine the tests are skipped, saying so.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def browser() -> Optional[str]:
    found = os.environ.get("MNV4_BROWSER") or next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    return found


def screenshot(page: Path, png: Path, width: int = 1100, height: int = 2400) -> np.ndarray:
    """The page rendered at `width` x `height` CSS pixels (scale 1) as an RGB array (height, width, 3)."""
    from PIL import Image

    exe = browser()
    if exe is None:
        pytest.skip("no headless browser (chromium / google-chrome) on this machine: the page's screenshot check "
                    "needs one (Debian: apt-get install chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={png.parent / 'browser-profile'}",
           f"--screenshot={png}", f"--window-size={width},{height}", Path(page).resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and png.is_file(), f"{exe} failed ({done.returncode}): {done.stderr[-2000:]}"
    return np.asarray(Image.open(png).convert("RGB"))


def colour_mask(img: np.ndarray, hex_colour: str, tolerance: int = 40) -> np.ndarray:
    """Pixels within `tolerance` (per channel) of the colour: a line's core, not its anti-aliased edge."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return (np.abs(img.astype(np.int16) - rgb) <= tolerance).all(axis=-1)


def not_blank(img: np.ndarray) -> float:
    """Share of pixels that are not page background (white)."""
    return float((img.astype(np.int16).sum(axis=-1) < 3 * 245).mean())


def dashed_columns(mask: np.ndarray, min_length: int, min_dashes: int) -> list[int]:
    """Columns where `mask` draws a vertical dashed line: at least `min_length` pixels set, in at least
    `min_dashes` separate runs (a polyline's steep segment is one run)."""
    out = []
    for x in np.nonzero(mask.sum(axis=0) >= min_length)[0]:
        col = mask[:, x].astype(np.int8)
        runs = int((np.diff(col) == 1).sum()) + int(col[0])
        if runs >= min_dashes:
            out.append(int(x))
    return out
