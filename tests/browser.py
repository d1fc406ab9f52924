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


def inspect_page(path: Path, *, width: int = 1280, pdf: bool = False) -> dict:
    """Load `path` in a `width`-pixel window; return its title, images (name, complete, natural size), console
    messages, the page's scroll and client widths, the table cells that read "None", and with `pdf` the page
    printed to PDF (bytes, A4, backgrounds on)."""
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
        driver.set_window_size(width, 1000)
        driver.get(Path(path).resolve().as_uri())
        widths = driver.execute_script(
            "return {scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth};")
        none_cells = driver.execute_script(
            "return Array.from(document.querySelectorAll('td,th')).filter(c => c.textContent.trim() === 'None')"
            ".length;")
        printed = None
        if pdf:
            import base64

            from selenium.webdriver.common.print_page_options import PrintOptions
            opts_pdf = PrintOptions()
            opts_pdf.background = True
            printed = base64.b64decode(driver.print_page(opts_pdf))
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,"
            " width: i.naturalWidth, height: i.naturalHeight}));")
        decoded = driver.execute_script(
            "return Promise.all(Array.from(document.images).map(i => i.decode().then(() => true, () => false)));")
        return {"title": driver.title, "images": images, "decoded": decoded,
                "console": driver.get_log("browser"),
                "screenshot": driver.get_screenshot_as_png(), "scroll_width": widths["scroll"],
                "client_width": widths["client"], "none_cells": none_cells, "pdf": printed}
    finally:
        driver.quit()


def pdf_pages_text(pdf: bytes) -> list[str] | None:
    """The text of each page of a PDF (poppler's pdftotext), or None where pdftotext is not installed."""
    import subprocess
    import tempfile
    tool = shutil.which("pdftotext")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "page.pdf"
        f.write_bytes(pdf)
        text = subprocess.run([tool, "-layout", str(f), "-"], capture_output=True, text=True, check=True).stdout
    return text.split("\f")[:-1] if text.endswith("\f") else text.split("\f")
