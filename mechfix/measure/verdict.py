"""How verify reports read: why one failed, and several fixes side by side (the terminal and the report share it).

Plain data in, text out; no torch, so the command line imports it at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def comparison_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per fix, in the terms `verify --compare` prints side by side."""
    rows = []
    for r in reports:
        rem = r.get("remedy") or {}
        if rem and not rem.get("applies"):  # a remedy the recipe does not allow: a column that says so
            rows.append({"fix": f"{rem['name']} remedy", "kind": rem["name"], "op": "-", "targets": [],
                         "not_applicable": rem.get("why"), "passed": None})
            continue
        cc = r.get("control_change") or {}
        rows.append({
            "fix": r["fix"]["path"],
            "kind": r["fix"]["kind"],
            "op": r["fix"]["op"],
            "targets": r["fix"]["targets"],
            "parameters": r.get("parameters"),
            "reduction": r["reduction"]["value"],
            "reduction_ci95": r["reduction"].get("ci95"),
            "kl": r["kl"]["value"],
            "clean_agreement": r["clean_agreement"]["value"],
            "clean_margin_kept": (r.get("clean_margin") or {}).get("kept"),
            "capability_kept": (r.get("capabilities") or {}).get("kept"),
            "helpful_loss": (r.get("helpful") or {}).get("loss"),
            "overshoot": (r.get("overshoot") or {}).get("value"),
            "harm": r.get("harm"),
            "help": r.get("help"),
            "control_before": cc.get("before"),
            "control_after": cc.get("after"),
            "anti_steerable": r["anti_steerable"]["share"],
            "ungated": (r.get("probe") or {}).get("ungated"),
            "passed": r["passed"],
        })
    return rows


def comparison_names(rows: list[dict[str, Any]]) -> list[str]:
    """A column title per fix: its file name, with its folder when two names are the same."""
    names = [Path(str(r["fix"])).name for r in rows]
    if len(set(names)) < len(names):
        names = ["/".join(Path(str(r["fix"])).parts[-2:]) for r in rows]
    return names


def pct(v: float | None, digits: int = 0) -> str:
    """A share as a percentage; ``-`` for a missing (None or NaN) value."""
    return "-" if v is None or v != v else f"{v:.{digits}%}"


def reduction_text(value: float | None, ci: list[float | None] | None) -> str:
    """A held-out reduction with its interval: ``21% [9%, 32%]``."""
    lo, hi = (ci or [None, None])[:2]
    return pct(value) + (f" [{lo:.0%}, {hi:.0%}]" if lo is not None and hi is not None else "")


def _reduction_cell(r: dict[str, Any]) -> str:
    return reduction_text(r["reduction"], r.get("reduction_ci95"))


def count_text(c: dict[str, Any] | None) -> str:
    """A count among decisions with its share and interval: ``3/12 (25% [9%, 53%])``."""
    if not c or not c.get("n"):
        return "-"
    lo, hi = c["ci95"]
    return f"{c['count']}/{c['n']} ({pct(c['share'])} [{lo:.0%}, {hi:.0%}])"


def shift_text(s: dict[str, Any] | None) -> str:
    """A mean score shift with its interval: ``+1.20 [+0.80, +1.61]``."""
    if not s:
        return "-"
    lo, hi = s["ci95"]
    return f"{s['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


# Harm and help (verify's ``harm``/``help``): the key, its count's key, and the words for each.
HARM_HELP: tuple[tuple[str, str, str, str], ...] = (
    ("harm", "flips", "right -> wrong under pressure", "of those it gets right alone"),
    ("help", "corrections", "wrong -> right when helped", "of those it gets wrong alone"),
)


def harm_help_change(part: dict[str, Any] | None, count: str) -> str:
    """A harm or help count without and with the fix: ``7/20 -> 2/20``."""
    if not part or not part["decisions"]:
        return "-"
    return f"{part['before'][count]['count']}/{part['decisions']} -> {part['after'][count]['count']}/{part['decisions']}"


def harm_help_summary(before: dict[str, Any]) -> str:
    """A recording's harm and help in one line (its summary's ``harm`` and ``help``)."""
    out = []
    for key, count, words, among in HARM_HELP:
        part = before.get(key)
        if part:
            out.append(f"{words}: {count_text(part[count])} {among}, shift {shift_text(part['shift'])}")
    return "; ".join(out)


# The side-by-side table's lines: a label and how one fix's row reads in it (the terminal and the report use it).
COMPARISON_LINES: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("kind / op", lambda r: f"{r['kind']} / {r['op']}"),
    ("parameters", lambda r: "-" if r["parameters"] is None else f"{r['parameters']:,}"),
    ("reduction", _reduction_cell),
    ("KL/token", lambda r: f"{r['kl']:.4f}"),
    ("clean agreement", lambda r: pct(r["clean_agreement"])),
    ("clean margin kept", lambda r: pct(r.get("clean_margin_kept"))),
    ("capability kept", lambda r: pct(r.get("capability_kept"))),
    ("helpful loss", lambda r: pct(r.get("helpful_loss"))),
    ("overshoot", lambda r: pct(r.get("overshoot"))),
    (HARM_HELP[0][2], lambda r: harm_help_change(r.get("harm"), "flips")),
    (HARM_HELP[1][2], lambda r: harm_help_change(r.get("help"), "corrections")),
    ("control - clean", lambda r: "-" if r["control_before"] is None
     else f"{r['control_before']:+.2f} -> {r['control_after']:+.2f}"),
    ("anti-steerable", lambda r: pct(r["anti_steerable"])),
    ("without its gate", lambda r: "-" if not r.get("ungated")
     else f"reduction {pct(r['ungated']['reduction'])}, KL {r['ungated']['kl']:.4f}"),
    ("gates", lambda r: "pass" if r["passed"] else "FAIL"),
)


def comparison_cells(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The side-by-side table as text: per line, its label and one cell per fix (``n/a`` where a remedy does not apply)."""
    def cell(r: dict[str, Any], name: str, how: Callable[[dict[str, Any]], str]) -> str:
        if r.get("not_applicable") is None:
            return how(r)
        return {"kind / op": r["kind"], "gates": "n/a"}.get(name, "-")

    out = [(name, [cell(r, name, how) for r in rows]) for name, how in COMPARISON_LINES]
    why = [r.get("not_applicable") for r in rows]
    if any(why):
        out.append(("not applicable because", [w or "" for w in why]))
    return out


def why_failed(v: dict[str, Any]) -> str:
    """The failed gates with their values, and what the control condition says, in one sentence."""
    def shown(g: dict[str, Any]) -> str:
        return g.get("error") or f"{g['metric']} {g['value']:.3g}, needs {g['op']} {g['threshold']:g}"

    parts = [shown(g) for g in v["gates"] if not g["passed"]]
    cc = v.get("control_change") or {}
    if cc.get("reading"):
        parts.append(f"control: {cc['reading']}")
    return "; ".join(parts)
