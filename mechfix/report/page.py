"""The report page: a run's numbers turned into one self-contained HTML file.

:func:`context` reads what the page shows out of the collected inputs (pure
data: tables, token shading, Plotly figures); :func:`render` fills the
template with it and inlines plotly.js, so the file opens offline and asks no
server for anything.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

import numpy as np

from mechfix.report import figures
from mechfix.report.collect import RunFiles, Source, chain
from mechfix.measure.verdict import (
    HARM_HELP,
    comparison_cells,
    comparison_names,
    comparison_rows,
    harm_help_change,
    harm_help_summary,
    pct,
    reduction_text,
    why_failed,
)

# How many live episodes per condition the page prints (folded), and how many state variables it plots.
LIVE_TRANSCRIPTS = 3
LIVE_VARIABLES = 4
# How many of the ranking's top heads get per-speaker bars.
SPEAKER_HEADS = 8
# The sections, in page order: id and title (a section without data says what would fill it).
SECTIONS = (
    ("summary", "Summary"),
    ("behaviour", "Behaviour per item"),
    ("attribution", "Attribution"),
    ("speakers", "Who carries it"),
    ("fix", "The fix"),
    ("compare", "Fixes and baselines side by side"),
    ("live", "Live episodes"),
    ("provenance", "Provenance"),
)


def _primary(run: RunFiles) -> dict[str, Any] | None:
    """The verify report the verdict comes from: the one of a given fix, else the first."""
    if not run.verify:
        return None
    shas = {f.sha256 for f in run.fixes}
    for v in run.verify:
        if (v.data.get("fix") or {}).get("sha256") in shas:
            return v.data
    return run.verify[0].data


def _fix_source(run: RunFiles, report: dict[str, Any] | None) -> Source | None:
    """The fix the verdict is about, else the only fix given."""
    if report is not None:
        sha = (report.get("fix") or {}).get("sha256")
        for f in run.fixes:
            if f.sha256 == sha:
                return f
    return run.fixes[0] if run.fixes else None


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _interval(ci: list[float | None] | None, spec: str) -> str:
    lo, hi = (ci or [None, None])[:2]
    return f"[{_fmt(lo, spec)}, {_fmt(hi, spec)}]"


def _ci(stat: dict[str, Any] | None, spec: str = "+.2f") -> str:
    if not stat:
        return "–"
    return f"{_fmt(stat.get('mean'), spec)} {_interval(stat.get('ci95'), spec)}"


def _recipe(run: RunFiles) -> dict[str, Any]:
    rec = run.record.data.get("recipe") if run.record else None
    return rec if isinstance(rec, dict) else {"name": run.name}


def _model(run: RunFiles) -> dict[str, Any]:
    for s in run.sources:
        if isinstance(s.data.get("model"), dict):
            return s.data["model"]
    v = _primary(run)
    return {"name": v.get("model")} if v else {}


def _style(run: RunFiles) -> str:
    for s in run.sources:
        st = s.data.get("style")
        if isinstance(st, dict) and st.get("name"):
            return st["name"] + (f" ({st['template']})" if st.get("template") else "")
    return "text"


def summary(run: RunFiles) -> dict[str, Any]:
    """Recipe, model, style, verdict and gates, the fix and the record's behaviour numbers."""
    report = _primary(run)
    fix_src = _fix_source(run, report)
    fix = (fix_src.data.get("fix") if fix_src else None) or (report or {}).get("fix") or {}
    recipe = _recipe(run)
    model = _model(run)
    rec_summary = run.record.data.get("summary", {}) if run.record else {}
    rows = [
        ("recipe", f"{recipe.get('name', run.name)}" + (f" ({recipe['family']})" if recipe.get("family") else "")),
        ("scenario", recipe.get("description") or "–"),
        ("model", f"{model.get('name', '–')}" + (f" · {model['architecture']}" if model.get("architecture") else "")
         + (f" · {model['n_parameters']:,} parameters" if model.get("n_parameters") else "")),
        ("style", _style(run)),
    ]
    if rec_summary:
        rows += [
            ("behaviour effect (all items)", _ci(rec_summary.get("effect"))),
            ("flip rate", _fmt((rec_summary.get("rate") or {}).get("rate"), ".0%")),
            ("control − clean (copying)", _ci(rec_summary.get("control_effect"))),
            ("beyond copying", _ci(rec_summary.get("beyond_copying"))),
            ("harm and help (all items)", harm_help_summary(rec_summary) or "–"),
        ]
    if fix:
        targets = fix.get("targets") or []
        rows.append(("fix", f"{fix.get('kind')} / {fix.get('op')} on {', '.join(targets) or '–'}, strength "
                            f"{_fmt(fix.get('strength'), 'g')}" + (f", {fix['parameters']:,} parameters"
                                                                  if fix.get("parameters") else "")))
        if fix.get("why"):
            rows.append(("why this fix", fix["why"]))
    gates = []
    if report is not None:
        for g in report.get("gates", []):
            gates.append({"name": g["name"], "value": g.get("error") or _fmt(g.get("value"), ".4g"),
                          "passed": bool(g["passed"])})
        if report.get("error") is None:  # a report of a verify that stopped on an error measured nothing
            rows += [
                ("held-out reduction", reduction_text(report["reduction"]["value"], report["reduction"].get("ci95"))),
                ("KL on neutral text", f"{_fmt(report['kl']['value'], '.4f')} nats/token"),
                ("overshoot", pct((report.get("overshoot") or {}).get("value"))),
                *((f"held out: {words}", harm_help_change(report.get(key), count) + " (without -> with the fix)")
                  for key, count, words, _ in HARM_HELP if report.get(key)),
            ]
    verdict = None if report is None else ("PASS" if report["passed"] else "FAIL")
    return {
        "rows": rows,
        "verdict": verdict,
        "why": why_failed(report) if report is not None and not report["passed"] else None,
        "gates": gates,
        "warnings": list((report or {}).get("warnings", [])),
        "heldout": (report or {}).get("heldout"),
    }


def behaviour(run: RunFiles) -> dict[str, Any]:
    """Per-item scores: held out, before and after the fix (verify), else the recording's (no fix)."""
    report = _primary(run)
    per = (report or {}).get("per_item")
    if per:
        flips = []
        for (item, rnd), b, a in zip(per["rows"], per["scores"]["pressure"]["before"], per["scores"]["pressure"]["after"]):
            if (b > 0) != (a > 0):
                flips.append({"item": item, "round": rnd, "before": f"{b:+.2f}", "after": f"{a:+.2f}",
                              "to": "aligned" if a <= 0 else "misaligned"})
        return {"figure": figures.item_scores(per), "flips": flips, "n": len(per["rows"]), "source": "verify"}
    if run.record is not None:
        conds = list(run.record.data.get("conditions", []))
        return {"figure": figures.recorded_scores(run.record.tensors, conds), "flips": None, "n": None,
                "source": "record"}
    return {}


def attribution(run: RunFiles) -> dict[str, Any]:
    """The layers × heads map, the ranking with estimates and exact effects, the opposing components."""
    att = run.attribution
    if att is None:
        return {}
    s = att.data.get("summary", {})
    top = [{"component": t["component"], "atp": _fmt(t.get("atp"), "+.3f"),
            "atp_ci": _interval(t.get("atp_ci95"), "+.3f"),
            "exact": _fmt(t.get("exact"), "+.3f"), "share": _fmt(t.get("share"), ".0%"), "flag": t.get("flag") or ""}
           for t in s.get("top", [])]
    shape = att.data.get("shape", {})
    return {
        "figure": figures.attribution_map(att.tensors, att.data),
        "layers": shape.get("layers"),
        "heads": shape.get("heads"),
        "top": top,
        "opposing": [{"component": o["component"], "effect": _fmt(o.get("effect"), "+.3f")} for o in s.get("opposing", [])],
        "total": _ci(s.get("total_effect")),
        "baseline": s.get("baseline"),
        "metric": att.data.get("metric"),
        "notes": [n for n in [s.get("speakers_note"), (s.get("positions") or {}).get("note"), *s.get("warnings", [])] if n],
    }


def _shade(v: float, scale: float) -> str:
    """A token's background: red draws towards the misaligned option, blue away; stronger for more."""
    a = min(1.0, abs(v) / scale) * 0.85 if scale > 0 else 0.0
    rgb = "214,39,40" if v > 0 else "31,119,180"
    return f"rgba({rgb},{a:.3f})"


def episodes(att: Source) -> dict[str, Any] | None:
    """The example decision per condition, tokens shaded by what the top heads draw from them."""
    ex = att.data.get("examples")
    if not ex:
        return None
    names = list(att.data.get("speakers", []))
    colours = figures.speaker_colours(names)
    heads = ex["heads"]
    values = {c: att.tensors[f"examples/{c}"].double().numpy() for c in ex["tokens"] if f"examples/{c}" in att.tensors}
    scale = max((float(np.abs(v.sum(1)).max()) for v in values.values() if v.size), default=0.0)
    out = []
    for c, v in values.items():
        total = v.sum(1)
        spk = ex["speakers"][c]
        turns: list[dict[str, Any]] = []
        by_speaker: dict[str, float] = {}
        for t, text in enumerate(ex["tokens"][c]):
            who = names[spk[t]] if 0 <= spk[t] < len(names) else "?"
            by_speaker[who] = by_speaker.get(who, 0.0) + float(total[t])
            per_head = ", ".join(f"{h} {v[t, k]:+.3f}" for k, h in enumerate(heads))
            token = {"text": text, "bg": _shade(float(total[t]), scale), "colour": colours.get(who, figures.FRAME_COLOUR),
                     "title": f"{who} · {text!r} · {total[t]:+.3f} ({per_head})"}
            if turns and turns[-1]["speaker"] == who:
                turns[-1]["tokens"].append(token)
            else:
                turns.append({"speaker": who, "colour": colours.get(who, figures.FRAME_COLOUR), "tokens": [token]})
        out.append({"condition": c, "turns": turns,
                    "by_speaker": [(k, f"{w:+.3f}", colours.get(k, figures.FRAME_COLOUR)) for k, w in by_speaker.items()]})
    return {"item": ex["item"], "heads": heads, "conditions": out, "scale": _fmt(scale, ".3f"),
            "legend": [(n, colours[n]) for n in names]}


def speakers(run: RunFiles) -> dict[str, Any]:
    """Per-speaker bars for the top heads and the shaded example episode."""
    att = run.attribution
    if att is None:
        return {}
    s = att.data.get("summary", {})
    heads = [t for t in s.get("top", []) if t.get("kind") == "heads"][:SPEAKER_HEADS]
    out: dict[str, Any] = {"note": s.get("speakers_note")}
    if "speakers" in att.tensors and heads:
        out["figure"] = figures.speaker_bars(att.tensors, att.data, heads)
    out["episodes"] = episodes(att)
    return out


def fix_section(run: RunFiles) -> dict[str, Any]:
    """The chosen fix's strength sweep and the candidates steer weighed."""
    src = _fix_source(run, _primary(run))
    if src is None:
        return {}
    m = src.data
    out: dict[str, Any] = {"name": src.name, "budget": m.get("budget") or {}, "notes": list(m.get("notes") or [])}
    if m.get("sweep"):
        out["figure"] = figures.sweep(m)
    sel = m.get("selection") or {}
    out["by"] = sel.get("by")
    out["candidates"] = [{
        "op": c.get("op"), "heads": c.get("heads"), "strength": _fmt(c.get("strength"), "g"),
        "cv": _fmt(c.get("cv_reduction"), ".0%"), "kl": _fmt(c.get("kl"), ".4f"),
        "within": "yes" if c.get("within_budget") else "no"} for c in sel.get("candidates", [])]
    return out


def compare(run: RunFiles) -> dict[str, Any]:
    """Several fixes on the same held-out decisions: a ``verify --compare`` report, or several reports given."""
    report = _primary(run)
    rows = (report or {}).get("comparison")
    if not rows and len(run.verify) > 1:
        rows = comparison_rows([v.data for v in run.verify])
    if not rows:
        return {}
    return {"names": comparison_names(rows), "lines": comparison_cells(rows)}


def live(run: RunFiles) -> dict[str, Any]:
    """A live recipe's state per round before (the recording) and after the fix (verify's replay), and transcripts."""
    rec_live = (run.record.data.get("live") if run.record else None) or {}
    report = _primary(run) or {}
    replay = report.get("live_outcome") or {}
    before = rec_live.get("episodes") or {}
    after = replay.get("episodes")
    if not before and not after:
        return {}
    any_eps = next(iter((before or after).values()), [])
    variables = list(any_eps[0]["final_state"]) if any_eps else []
    figs = [(v, figures.live_rounds(before, after, v)) for v in variables[:LIVE_VARIABLES]]

    def transcripts(eps_by_cond: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        return [{"condition": c, "item": e["item"], "text": e["transcript"],
                 "state": ", ".join(f"{k} {_fmt(v, 'g')}" for k, v in e["final_state"].items())}
                for c, eps in eps_by_cond.items() for e in eps[:LIVE_TRANSCRIPTS]]

    return {"figures": figs, "before": transcripts(before), "after": transcripts(after or {}),
            "fixed_agents": replay.get("fixed_agents"), "outcome": replay}


def context(run: RunFiles) -> dict[str, Any]:
    """Everything the template needs, as plain data (figures still as Plotly objects)."""
    parts = {
        "summary": summary(run),
        "behaviour": behaviour(run),
        "attribution": attribution(run),
        "speakers": speakers(run),
        "fix": fix_section(run),
        "compare": compare(run),
        "live": live(run),
        "provenance": chain(run),
    }
    versions = next((s.data.get("libraries") for s in run.sources if s.data.get("libraries")), {})
    return {"title": f"mechfix report: {run.name}", "name": run.name, "sections": SECTIONS, "parts": parts,
            "versions": versions}


def _figure_json(fig) -> str:
    # "</" inside a script element would end it early.
    return fig.to_json().replace("</", "<\\/")


def render(run: RunFiles) -> str:
    """The report page for a run, as one HTML string."""
    import secrets

    import jinja2
    from markupsafe import Markup
    from plotly.offline import get_plotlyjs

    ctx = context(run)
    figs: dict[str, str] = {}

    def plot(fig, fid: str) -> str:
        figs[fid] = _figure_json(fig)
        return fid

    # Where plotly.js and the figures go is marked with a random token made for this render: text from the
    # artifacts (a recipe's description, an agent's words) cannot know it, so it can never take their place.
    # The token does not stay on the page, so the same files still make the same page.
    nonce = secrets.token_hex(16)
    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
    env.globals.update(plot=plot, slot=lambda name: Markup(f"@@{nonce}:{name}@@"))
    template = env.from_string(resources.files("mechfix.report").joinpath("page.html.j2").read_text(encoding="utf-8"))
    body = template.render(**ctx)
    data = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in figs.items()) + "}"  # each figure is JSON already
    head, middle, tail = _split_slots(body, nonce, ("plotly_js", "figures"))
    return head + get_plotlyjs().replace("</script", "<\\/script") + middle + data + tail


def _split_slots(body: str, nonce: str, names: tuple[str, ...]) -> list[str]:
    """``body`` cut at each named slot, in order; each slot must appear exactly once."""
    parts, rest = [], body
    for name in names:
        marker = f"@@{nonce}:{name}@@"
        if body.count(marker) != 1:
            raise RuntimeError(f"the report template must hold slot {name} exactly once")
        before, rest = rest.split(marker, 1)
        parts.append(before)
    return [*parts, rest]
