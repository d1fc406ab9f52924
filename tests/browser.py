"""Open an HTML file in headless Chromium (Debian's chromium + chromium-driver) through Selenium."""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists()
                                                else None)


def available() -> bool:
    if not (CHROMIUM and CHROMEDRIVER):
        return False
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return True


def inspect_page(path: Path) -> dict:
    """Load `path`; return its title, images (name, complete, natural size) and console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(Path(path).resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,"
            " width: i.naturalWidth, height: i.naturalHeight}));")
        decoded = driver.execute_script(
            "return Promise.all(Array.from(document.images).map(i => i.decode().then(() => true, () => false)));")
        return {"title": driver.title, "images": images, "decoded": decoded,
                "console": driver.get_log("browser"),
                "screenshot": driver.get_screenshot_as_png()}
    finally:
        driver.quit()
