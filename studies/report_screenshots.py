"""Screenshots of a study report for the docs: the first screen and the example-tied dropout section.

    python studies/report_screenshots.py runs/study --out docs/img      # after `memloc run --out runs/study`

Needs Debian's chromium and chromium-driver and selenium (the browser test's). Writes
report_first_screen.png (the first 1,280 x 900 px: setting, contents, the claims in words and
the claims table) and report_example_tied.png (the example-tied dropout section from its
heading); docs/report.md shows them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help="a finished study folder (its report/report.html)")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args()
    import browser
    if not browser.available():
        raise SystemExit("needs chromium, chromium-driver and selenium (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    page = Path(args.study) / "report" / "report.html"
    if not page.exists():
        raise SystemExit(f"{page} does not exist: pass a finished study (memloc run --out STUDY)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser.CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(browser.CHROMEDRIVER), options=opts)
    try:
        driver.set_window_size(args.width, args.height)
        driver.get(page.resolve().as_uri())
        first = out / "report_first_screen.png"
        first.write_bytes(driver.get_screenshot_as_png())
        heading = next((h for h in driver.find_elements(By.TAG_NAME, "h2") if h.text.startswith("Example-tied")),
                       None)
        if heading is None:
            raise SystemExit("the report has no example-tied dropout section")
        driver.execute_script("arguments[0].scrollIntoView(true);", heading)
        tied = out / "report_example_tied.png"
        tied.write_bytes(driver.get_screenshot_as_png())
    finally:
        driver.quit()
    print(f"wrote {first} and {tied}")


if __name__ == "__main__":
    main()
