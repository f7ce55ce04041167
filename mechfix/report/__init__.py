"""``mechfix report``: one self-contained HTML page that shows a run's diagnosis and fix.

:func:`collect` reads the artifacts and verify reports of a run;
:func:`render` turns them into the page (plotly.js inline, no network).
"""

from mechfix.report.collect import RunFiles, Source, chain, collect
from mechfix.report.page import context, render

__all__ = ["RunFiles", "Source", "chain", "collect", "context", "render"]
