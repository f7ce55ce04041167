"""Take the README's screenshot of a report page in headless chromium (the browser the tests use).

    python tools/report_screenshot.py conformity/conformity.report.html docs/conformity-report.png

Shows the sections from the attribution to the per-token episodes, with the
mouse on the top head's cell so that its hover (estimate, interval, exact) is
in the picture.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", type=Path, help="A report page (NAME.report.html).")
    ap.add_argument("out", type=Path, help="PNG to write.")
    ap.add_argument("--sections", default="attribution,speakers", help="Ids of the first and last section to show.")
    ap.add_argument("--scheme", default="light", choices=("light", "dark"))
    ap.add_argument("--width", type=int, default=1200)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium found: apt install chromium")
    first, last = args.sections.split(",")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": 900}, color_scheme=args.scheme,
                                device_scale_factor=1)
        page.goto(args.page.resolve().as_uri())
        page.wait_for_function("window.mechfixFigures !== undefined")
        page.add_style_tag(content="nav { display: none; }")  # the sticky bar would cover the top of the clip
        top = page.evaluate(f"document.getElementById('{first}').getBoundingClientRect().top + window.scrollY")
        bottom = page.evaluate(f"document.getElementById('{last}').getBoundingClientRect().bottom + window.scrollY")
        # The mouse on the top head's cell: its hover is part of the picture.
        cell = page.evaluate("""() => { const g = document.getElementById('fig-attribution'); g.scrollIntoView();
            const z = g.calcdata[0][0].z; let best = [0, 0];
            z.forEach((row, l) => row.forEach((v, h) => { if (v > z[best[0]][best[1]]) best = [l, h]; }));
            const r = g.getBoundingClientRect(), xa = g._fullLayout.xaxis, ya = g._fullLayout.yaxis;
            return [r.left + xa._offset + xa.c2p(best[1]), r.top + ya._offset + ya.c2p(best[0])]; }""")
        page.mouse.move(*cell)
        page.wait_for_selector("#fig-attribution .hovertext")
        scroll = page.evaluate("window.scrollY")
        page.screenshot(path=str(args.out), full_page=True,
                        clip={"x": 0, "y": top, "width": args.width, "height": bottom - top})
        browser.close()
    print(f"wrote {args.out} (page from {first} to {last}; scrolled {scroll:.0f} px for the hover)")


if __name__ == "__main__":
    main()
