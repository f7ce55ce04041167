"""Open a report page in a real headless browser (Debian's chromium, driven by Playwright) and read what it shows.

CI installs chromium (`.ci/run`) and sets MECHFIX_REQUIRE_BROWSER=1, so there
a missing browser fails the tests; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("MECHFIX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

# What the page reports about itself once drawn: its sections, each figure's traces and drawn SVG, the
# heatmaps' cells as drawn (Plotly's calcdata), the marked points, the episodes and the plots of live state.
_READ = """() => {
  const cells = (id, k) => { const g = document.getElementById(id); if (!g || !g.calcdata) return null;
                             const z = g.calcdata[k][0].z; return [z.length, z[0].length]; };
  const figs = {};
  for (const id of window.mechfixFigures) {
    const g = document.getElementById(id);
    figs[id] = {traces: g.data.length, drawn: !!g.querySelector('svg.main-svg'), points:
                g.data.reduce((n, t) => n + ((t.mode || '').includes('markers') && t.y ? t.y.filter(v => v !== null).length : 0), 0)};
  }
  return {
    sections: [...document.querySelectorAll('main > section')].map(s => s.id),
    figures: figs,
    heads: cells('fig-attribution', 0),
    layers: cells('fig-attribution', 1),
    episodes: [...document.querySelectorAll('.episode')].map(e => e.dataset.condition),
    tokens: document.querySelectorAll('.episode .tok').length,
    verdict: document.getElementById('verdict').textContent.trim(),
    comparison: [...document.querySelectorAll('#comparison tr:first-child th')].slice(1).map(t => t.textContent),
    transcripts: document.querySelectorAll('#live details').length,
    background: getComputedStyle(document.body).backgroundColor,
    font: (() => { const g = document.getElementById(window.mechfixFigures[0]);
                   return g ? g._fullLayout.font.color : null; })(),
  };
}"""


# Where on the screen a heads cell (layer, head) of the attribution map is, once scrolled into view.
_CELL = """([l, h]) => { const g = document.getElementById('fig-attribution'); g.scrollIntoView();
  const r = g.getBoundingClientRect(), xa = g._fullLayout.xaxis, ya = g._fullLayout.yaxis;
  return [r.left + xa._offset + xa.c2p(h), r.top + ya._offset + ya.c2p(l)]; }"""


def need_browser() -> None:
    """Skip (or, in CI, fail) when there is no chromium or no Playwright to drive it."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        problem = "Playwright is not installed (pip install -e '.[test]')"
    else:
        problem = None if CHROMIUM else "no chromium found (apt install chromium, or set MECHFIX_CHROMIUM)"
    if problem is None:
        return
    if os.environ.get("MECHFIX_REQUIRE_BROWSER") == "1":
        pytest.fail(f"the browser checks of the report need a browser: {problem}")
    pytest.skip(f"browser checks of the report: {problem}")


def open_page(path: Path, scheme: str = "light", hover: tuple[int, int] | None = None, media: str = "screen") -> dict[str, Any]:
    """Load ``path`` offline and return what it shows, the console, every request and a screenshot.

    Args:
        path: The HTML file.
        scheme: ``light`` or ``dark``: the colour scheme the browser prefers.
        hover: A heads cell (layer, head) to hover; its tooltip's text comes back as ``hover``.
        media: ``screen`` or ``print``.
    """
    from playwright.sync_api import sync_playwright

    need_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900}, color_scheme=scheme)
            console, requests = [], []
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
            page.on("request", lambda r: requests.append(r.url))
            page.emulate_media(media=media)
            page.goto(path.resolve().as_uri())
            page.wait_for_function("window.mechfixFigures !== undefined")
            out = page.evaluate(_READ)
            if hover is not None:  # the mouse on that cell, as a reader would put it
                x, y = page.evaluate(_CELL, list(hover))
                page.mouse.move(x, y)
                page.wait_for_selector("#fig-attribution .hovertext")
                out["hover"] = page.evaluate(
                    "[...document.querySelectorAll('#fig-attribution .hovertext tspan.line')].map(t => t.textContent)")
            out["screenshot"] = page.screenshot(full_page=True)
        finally:
            browser.close()
    out["console"], out["requests"] = console, requests
    return out


def not_blank(png: bytes) -> bool:
    """A screenshot with real content: many colours, and pixels far from the background."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    colours = len(np.unique(img.reshape(-1, 3)[::7], axis=0))
    return img.std() > 10 and colours > 200
