"""How results are printed: the rich tables and lines each command writes to stderr."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from mechfix.textio import clean_nan
from mechfix.cli.common import err, shown, styled
from mechfix.measure.verdict import (
    HARM_HELP,
    comparison_cells,
    comparison_names,
    count_text,
    harm_help_change,
    harm_help_summary,
    shift_text,
    why_failed,
)
from mechfix.measure.verdict import pct as _pct  # one formatting of shares for the terminal and the report


def _fmt_ci(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "-"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:+.2f}  [{lo:+.2f}, {hi:+.2f}]"


def _fmt_effect(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{value:+.2f}"


def _budget_title(budget: dict[str, Any]) -> str:
    parts = [f"KL <= {budget['max_kl']:g}", f"clean agreement >= {budget['min_clean_agreement']:.0%}"]
    if budget.get("min_clean_margin") is not None:
        parts.append(f"clean margin kept >= {budget['min_clean_margin']:.0%}")
    if budget.get("min_capability") is not None:
        parts.append(f"capability kept >= {budget['min_capability']:.0%}")
    if budget.get("max_helpful_loss") is not None:
        parts.append(f"helpful loss <= {budget['max_helpful_loss']:.0%}")
    if budget.get("max_overshoot") is not None:
        parts.append(f"overshoot <= {budget['max_overshoot']:.0%}")
    return ", ".join(parts)


_SHORT = {"clean_agreement": "clean", "clean_margin": "margin", "helpful_loss": "helpful", "capability": "capab"}


def print_record_summary(summary: dict[str, Any], model: str, recipe: str, wrote: str | None = None) -> None:
    t = Table(title=f"{recipe} on {model}", title_justify="left")
    t.add_column("condition")
    t.add_column("mean score", justify="right")
    t.add_column("prefers misaligned", justify="right")
    for c, v in summary["per_condition"].items():
        t.add_row(c, f"{v['score']:+.2f}", f"{v['prefers_misaligned']:.0%}")
    err.print(t)
    rate = summary["rate"]
    over = f"{summary['items']} items"
    if summary.get("rounds"):
        over = f"{summary['decisions_per_condition']} decisions ({summary['items']} items x {summary['rounds']} rounds)"
    err.print(f"effect (pressure - clean), mean [95% CI]: {_fmt_ci(summary['effect'])}  over {over}")
    rate_s = "n/a" if rate["rate"] is None else f"{rate['rate']:.0%}"  # None: NaN, nothing eligible
    err.print(f"rate (preferred option flips to misaligned): {rate_s}  ({rate['flipped']}/{rate['eligible']})")
    if summary.get("control_effect"):
        err.print(f"control effect (control - clean):          {_fmt_ci(summary['control_effect'])}")
        err.print(f"beyond copying (pressure - control):        {_fmt_ci(summary['beyond_copying'])}")
    if summary.get("helpful_influence"):
        err.print(f"helpful influence (clean - helpful):        {_fmt_ci(summary['helpful_influence'])}")
    if harm_help_summary(summary):
        err.print(f"harm and help: {harm_help_summary(summary)}", soft_wrap=True)
    if summary.get("generated_choices"):
        for c, v in summary["generated_choices"].items():
            err.print(
                f"generated replies, {c}: misaligned {v['misaligned']:.0%}, aligned {v['aligned']:.0%}, "
                f"unparsed {v['unparsed']:.0%}"
            )
    if summary.get("by_round"):
        _print_rounds(summary["by_round"], summary.get("outcome", {}))
    err.print(f"split: {summary['train']} train / {summary['heldout']} held out." + (f"  wrote {wrote}" if wrote else ""))
    err.print("score = log P(misaligned) - log P(aligned); positive means the misaligned option is preferred.")


def _print_rounds(by_round: list[dict[str, Any]], outcome: dict[str, Any]) -> None:
    """A live recording: the effect round by round, and what the episodes came to per condition."""
    conds = list(by_round[0]["per_condition"]) if by_round else []
    t = Table(title="round by round (per condition: the share preferring the misaligned option)", title_justify="left")
    for name in ("round", "effect", "95% CI", "rate", *conds):
        t.add_column(name, justify="right", no_wrap=True)
    for r in by_round:
        rate, (lo, hi) = r["rate"]["rate"], r["effect"]["ci95"]
        t.add_row(str(r["round"]), f"{r['effect']['mean']:+.2f}", f"[{lo:+.2f}, {hi:+.2f}]",
                  "n/a" if rate is None else f"{rate:.0%}",
                  *(f"{r['per_condition'][c]['prefers_misaligned']:.0%}" for c in conds))
    err.print(t)
    for c, o in outcome.items():
        _print_outcome(c, o)


def _print_outcome(condition: str, o: dict[str, Any], prefix: str = "") -> None:
    state = ", ".join(f"{k} {v:.4g}" for k, v in o["final_state"].items())
    err.print(
        f"{prefix}{condition}: after the last round {state or '(no state)'}; the target's replies name the misaligned "
        f"option {o['misaligned_replies']:.0%}, the aligned {o['aligned_replies']:.0%}"
        + (f"; {o['missing_captures']:.0%} of captures said no number" if o["missing_captures"] else ""),
        soft_wrap=True,
    )


def print_attribution(summary: dict[str, Any], model: str, recipe: str, wrote: str | None = None) -> None:
    total = summary["total_effect"]
    method = {"atp": "attribution patching", "exact": "exact patching", "both": "attribution patching, top confirmed exactly"}
    t = Table(
        title=f"{recipe} on {model}: top components ({method.get(summary['method'], summary['method'])}, restoring {summary['baseline']})",
        title_justify="left",
    )
    t.add_column("#", justify="right")
    t.add_column("component")
    t.add_column("estimate [95% CI]", justify="right")
    t.add_column("exact [95% CI]", justify="right")
    t.add_column("share", justify="right")
    for i, e in enumerate(summary["top"], 1):
        share = "-" if e.get("share") is None else f"{e['share']:.0%}"
        name = styled(f"{shown(e['component'])} [yellow]![/yellow]") if e.get("flag") else e["component"]
        t.add_row(str(i), name, _fmt_effect(e["atp"], e["atp_ci95"]), _fmt_effect(e["exact"], e["exact_ci95"]), share)
    err.print(t)
    err.print(
        f"behaviour to explain (pressure - {summary['baseline']}): {_fmt_ci(total)} over {summary['decisions']} "
        "training decisions"
    )
    err.print("effect = how much of the score goes away when the component is restored at the decision position.")
    if summary.get("opposing"):
        err.print("strongest opposing: " + ", ".join(f"{o['component']} {o['effect']:+.2f}" for o in summary["opposing"]))
    spoken = [e for e in summary["top"] if e.get("speakers")][:5]
    if spoken:
        err.print("who carries it (per-speaker split of each top head's estimate, largest first):")
        for e in spoken:
            parts = sorted(e["speakers"].items(), key=lambda kv: -abs(kv[1]))[:4]
            err.print(f"  {e['component']}: " + ", ".join(f"{k} {v:+.2f}" for k, v in parts))
    agree = summary.get("agreement")
    if agree:
        rho = "n/a" if agree["spearman"] is None else f"{agree['spearman']:.2f}"
        err.print(
            f"estimate vs exact over the top {agree['k']}: Spearman {rho}, top-5 overlap "
            f"{agree['top5_overlap']}/{agree['top5_of']}"
        )
    resid = [(r["layer"], r["resid_exact"] if r["resid_exact"] is not None else r["resid_atp"]) for r in summary["layers"]]
    if resid and all(v is not None for _, v in resid):
        kind = "exact" if summary["layers"][0]["resid_exact"] is not None else "estimate"
        err.print(f"residual stream by layer ({kind}): " + " ".join(f"L{layer} {v:+.1f}" for layer, v in resid))
    everywhere = summary.get("everywhere")
    if everywhere:
        err.print("restored at every position (exact; what a change of the module's weights can reach): "
                  + ", ".join(f"{e['module']} {e['effect']:+.2f}" for e in everywhere["top"]), soft_wrap=True)
    for w in summary.get("warnings", []):
        err.print(f"[yellow]![/yellow] {shown(w)}", soft_wrap=True, markup=True)
    for note in (summary.get("speakers_note"), summary["positions"]["note"]):
        if note:
            err.print(f"note: {note}", soft_wrap=True)
    if wrote:
        err.print(f"wrote {wrote}")


def print_sweep(sweep: list[dict[str, Any]], chosen: float | None, budget: dict[str, float], title: str) -> None:
    ops = sorted({f"{p.get('op')}" + (f" on {p['heads']} heads" if p.get("heads") else "") for p in sweep if p.get("op")})
    t = Table(title=f"{title}{': ' + ', '.join(ops) if ops else ''}; budget: {_budget_title(budget)}; fit/cv = "
              "reduction on the training fit / cross-validated over items; helpf- = helpful influence removed",
              title_justify="left")
    # Narrow headers, so that the table fits 80 columns: fit = training-fit reduction, cv = cross-validated one.
    for name in ("s", "fit", "cv", "KL", "clean", "margin", "capab", "helpf-", ""):
        t.add_column(name, justify="left" if name == "" else "right", no_wrap=True)
    for p in sweep:
        if chosen is not None and p["strength"] == chosen:
            mark = styled("[bold green]chosen[/bold green]")
        elif p.get("over"):
            mark = styled("[yellow]over " + shown(",".join(_SHORT.get(o, o) for o in p["over"])) + "[/yellow]")
        elif p.get("measured") == "scored":
            mark = styled("[dim]-[/dim]")
        else:
            mark = "" if p["within_budget"] else styled("[yellow]over[/yellow]")
        kl = "-" if p["kl"] is None else (">" if p.get("kl_lower_bound") else "") + f"{p['kl']:.4f}"
        t.add_row(f"{p['strength']:g}", _pct(p["reduction"]), _pct(p.get("cv_reduction")), kl, _pct(p["clean_agreement"]),
                  _pct(p.get("clean_margin")), _pct(p.get("capability")), _pct(p.get("helpful_loss")), mark)
    err.print(t)


def print_candidates(selection: dict[str, Any]) -> None:
    """One line per candidate (operation, heads): its best cross-validated reduction inside the budget."""
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for p in selection.get("candidates", []):
        rows.setdefault((p["op"], p["heads"]), []).append(p)
    if len(rows) < 2:
        return
    t = Table(title=f"candidates, by {selection.get('by')} ({selection.get('folds')} folds of items)", title_justify="left")
    for name in ("op", "heads", "best inside the budget", "at strength", "points measured"):
        t.add_column(name, justify="left" if name == "op" else "right")
    for (op, heads), pts in rows.items():
        if all(p.get("measured") == "cv" for p in pts):
            p = pts[0]
            t.add_row(op, str(heads or "-"), f"not searched: {_pct(p.get('cv_reduction'))} cross-validated at "
                      f"{p['strength']:g}", "-", str(len(pts)))
            continue
        ok = [p for p in pts if p["within_budget"] and p["strength"] > 0]
        key = "cv_reduction" if pts[0].get("cv_reduction") is not None else "reduction"
        best = max(ok, key=lambda p: -1 if p[key] is None else p[key]) if ok else None
        t.add_row(op, str(heads or "-"), "none" if best is None else _pct(best[key]),
                  "-" if best is None else f"{best['strength']:g}", str(len(pts)))
    err.print(t)


def training_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """A LoRA fix's training in brief: steps, seconds, first and last losses, the folded strength."""
    steps = manifest["training"].get("steps", [])
    return {"steps": len(steps), "seconds": manifest["training"].get("seconds", 0.0), "first": steps[0] if steps else None,
            "last": steps[-1] if steps else None, "folded_strength": manifest["fix"].get("folded_strength")}


def _print_training(t: dict[str, Any]) -> None:
    first, last = t.get("first") or {}, t.get("last") or {}
    err.print(
        f"training: {t['steps']} steps in {t['seconds']:.0f} s, loss {first.get('loss', float('nan')):.3f} -> "
        f"{last.get('loss', float('nan')):.3f} (behaviour {last.get('behaviour', float('nan')):.3f}, KL {last.get('kl', float('nan')):.4f}); "
        f"strength {t.get('folded_strength')} folded into the adapter's B"
    )


def print_steer(summary: dict[str, Any]) -> None:
    chosen_strength = summary["chosen"]["strength"]
    if summary.get("selection"):
        print_candidates(summary["selection"])
    print_sweep(summary["sweep"], chosen_strength, summary["budget"], "the chosen candidate's strengths (training split)")
    for note in (summary.get("selection") or {}).get("notes", []):
        err.print(f"note: {note}", soft_wrap=True)
    if summary.get("training"):
        _print_training(summary["training"])
    err.print(f"fix: {summary['kind']} / {summary['op']} on {', '.join(summary['targets'])} at strength {chosen_strength:g}"
              f" ({summary.get('parameters')} parameters)")
    err.print(f"targets: {summary['why']}", soft_wrap=True)
    if summary.get("gate"):
        _print_gate(summary["gate"])
    ch = summary["chosen"]
    cv = "" if ch.get("cv_reduction") is None else f" ({_pct(ch['cv_reduction'])} cross-validated over items)"
    err.print(
        f"training split: behaviour {_fmt_ci(ch['effect'])} left, reduction {_pct(ch['reduction'])}{cv}, "
        f"KL {ch['kl']:.4f} nats/token, clean agreement {ch['clean_agreement']:.0%}. Verify it on held-out episodes "
        "with `mechfix verify`."
    )
    extra = " (a PEFT adapter folder: peft.PeftModel.from_pretrained(model, folder) loads it)" if summary["kind"] == "lora" else ""
    err.print(f"wrote {summary['artifact']}{extra}")


def print_fix(manifest: dict[str, Any]) -> None:
    """What a fix artifact applies, and the sweep that chose its strength (for `mechfix show`)."""
    f = manifest["fix"]
    err.print(f"fix: {f.get('kind')} / {f.get('op')} on {', '.join(f.get('targets', []))} at strength {f.get('strength')}"
              + (f" ({f['parameters']} parameters)" if "parameters" in f else ""))
    err.print(f"hook: {f.get('hook')}, at {f.get('positions')} positions; {f.get('formula')}", soft_wrap=True)
    if f.get("loss"):
        err.print(f"loss: {f['loss']}", soft_wrap=True)
    if f.get("exported_from"):
        src = f["exported_from"]
        err.print(f"exported from: {src.get('path')} (sha256 {str(src.get('sha256'))[:12]}), {src.get('kind')} / {src.get('op')} "
                  f"on {', '.join(src.get('targets') or [])} at strength {src.get('strength'):g}, folded into B; "
                  "the sweep below is that fix's", soft_wrap=True)
    if f.get("gate"):
        _print_gate(f["gate"])
    if manifest.get("training"):
        _print_training(training_summary(manifest))
    if manifest.get("selection"):
        print_candidates(clean_nan(manifest["selection"]))
    if manifest.get("sweep") and manifest.get("budget"):
        chosen = (manifest.get("chosen") or {}).get("strength", f.get("strength"))
        print_sweep(clean_nan(manifest["sweep"]), chosen, manifest["budget"], "the chosen candidate's strengths (training split)")


def _print_gate(gate: dict[str, Any]) -> None:
    """A gated fix's probe: where it reads, its threshold, and how it did on the training split."""
    tr = gate.get("train") or {}
    fires = tr.get("fires") or {}
    err.print(f"gate: a linear probe of L{gate['layer']}'s residual stream; the fix edits a position only where the probe's "
              f"logit is above {gate['threshold']:.3g} (layer chosen: {gate.get('chosen_by', 'given')})",
              soft_wrap=True)
    if tr:
        err.print(f"gate on the training split: AUROC {_num(tr.get('auroc'))} (pressure vs baseline), fires on "
                  f"{_pct(fires.get('pressure'))} of pressure and {_pct(fires.get('baseline'))} of baseline decisions and "
                  f"{_pct(fires.get('neutral_tokens'), 1)} of {tr.get('neutral_tokens', 0):,} neutral tokens", soft_wrap=True)


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _print_probe(probe: dict[str, Any]) -> None:
    """What a gated fix's probe did on the held-out decisions, and the same fix without its gate."""
    fires = ", ".join(f"{c} {_pct(v)}" for c, v in probe["fires"].items())
    vs_help = f", {_num(probe['auroc_helpful'])} (pressure vs helpful)" if probe.get("auroc_helpful") is not None else ""
    err.print(f"gate (probe on L{probe['layer']}): AUROC {_num(probe['auroc'])} held out (pressure vs clean){vs_help}; fires on {fires} "
              f"of the decisions and {_pct(probe['fires_neutral_tokens'], 1)} of {probe['neutral_tokens']:,} neutral tokens",
              soft_wrap=True)
    u = probe["ungated"]
    err.print(f"the same fix without its gate, same strength: reduction {_pct(u['reduction'])}, KL {u['kl']:.4f} nats/token, "
              f"clean agreement {_pct(u['clean_agreement'])}", soft_wrap=True)


def print_verify(report: dict[str, Any], title: str) -> None:
    t = Table(title=title, title_justify="left")
    t.add_column("held-out", justify="left")
    t.add_column("without fix", justify="right", no_wrap=True)
    t.add_column("with fix", justify="right", no_wrap=True)
    b, a = report["before"], report["after"]
    t.add_row("effect (pressure - clean)", _fmt_ci(b["effect"]), _fmt_ci(a["effect"]))
    fr = lambda r: "-" if r["rate"] is None else f"{r['rate']:.0%} ({r['flipped']}/{r['eligible']})"  # noqa: E731
    t.add_row("flip rate", fr(b["rate"]), fr(a["rate"]))
    if b.get("control_effect"):
        t.add_row("control - clean", _fmt_ci(b["control_effect"]), _fmt_ci(a["control_effect"]))
    if b.get("helpful_influence"):
        t.add_row("clean - helpful", _fmt_ci(b["helpful_influence"]), _fmt_ci(a["helpful_influence"]))
    cm = report.get("clean_margin")
    if cm:
        t.add_row("clean margin", f"{cm['before']:+.2f}", f"{cm['after']:+.2f}")
    pa = report.get("pressure_aligned")
    if pa:
        t.add_row("pressure: aligned chosen", _pct(pa["before"]), _pct(pa["after"]))
    for key, count, words, among in HARM_HELP:
        part = report.get(key)
        if part and part["decisions"]:
            alone = among.removeprefix("of those it gets ")
            t.add_row(f"{key}: {count} (of {part['decisions']} {alone})", count_text(part["before"][count]),
                      count_text(part["after"][count]))
            t.add_row(f"{key}: shift", shift_text(part["before"]["shift"]), shift_text(part["after"]["shift"]))
    err.print(t)
    capab = report.get("capabilities")
    if capab:
        c = Table(title="capabilities (accuracy [95% CI]; clean margin = log P(aligned) - log P(misaligned) on clean "
                  "decisions)", title_justify="left")
        for name in ("task", "items", "chance", "without fix", "with fix", "kept"):
            c.add_column(name, justify="left" if name == "task" else "right", no_wrap=name == "task")
        for name, task in capab["tasks"].items():
            acc = lambda x: f"{_pct(x['accuracy'])} [{x['ci95'][0]:.0%}-{x['ci95'][1]:.0%}]"  # noqa: E731
            kept = _pct(task["kept"]) if task["measurable"] else "not above chance"
            c.add_row(name, str(task["items"]), _pct(task["chance"]), acc(task["before"]), acc(task["after"]), kept)
        err.print(c)
    red = report["reduction"]
    ci = red.get("ci95") or [None, None]
    ci_txt = f" [{ci[0]:.0%}, {ci[1]:.0%}]" if ci[0] is not None else ""
    val = "n/a" if red["value"] is None else f"{red['value']:.0%}"
    err.print(f"reduction {val}{ci_txt} over {report['heldout']} held-out decisions")
    ov = report.get("overshoot")
    if ov and ov["value"] is not None:
        past = ov["past_clean"]
        err.print(f"overshoot {_pct(ov['value'])} (pressure now pushes away from the others' answer: {past['count']} of "
                  f"{past['n']} decisions past where they stand alone)")
    err.print(f"KL on neutral text {report['kl']['value']:.4f} nats/token ({report['kl']['tokens']} tokens)")
    err.print(f"clean agreement {report['clean_agreement']['value']:.0%}")
    if report.get("parameters") is not None:
        err.print(f"the fix adds {report['parameters']:,} numbers to the model")
    if report.get("probe"):
        _print_probe(report["probe"])
    anti = report["anti_steerable"]
    err.print(f"anti-steerable: {anti['count']} of {anti['n']} held-out decisions get worse with the fix ({anti['share']:.0%})")
    cc = report.get("control_change")
    if cc:
        err.print(f"control: {cc['before']:+.2f} -> {cc['after']:+.2f}; {cc['reading']}")
    hp = report.get("helpful")
    if hp and hp.get("loss") is not None:
        err.print(f"helpful influence: {hp['before']:+.2f} -> {hp['after']:+.2f} ({_pct(hp['loss'])} of it removed)")
    g = Table(title="gates", title_justify="left")
    g.add_column("gate")
    g.add_column("value", justify="right")
    g.add_column("result")
    for gate in report["gates"]:
        value = "-" if gate["value"] is None else f"{gate['value']:.4g}"
        res = styled("[red]error[/red]" if gate.get("error") else ("[green]pass[/green]" if gate["passed"] else "[red]FAIL[/red]"))
        g.add_row(gate["name"], value, res)
    err.print(g)
    live = report.get("live_outcome")
    if live:
        who = "every agent" if live.get("fixed_agents") == "all" else "the target only"
        err.print(f"live episodes played again with the fix on {who} (all items):")
        for c in live["before"]:
            _print_outcome(c, live["before"][c], prefix="  without fix, ")
            _print_outcome(c, live["after"][c], prefix="  with fix,    ")
    for w in report.get("warnings", []):
        err.print(f"[yellow]![/yellow] {shown(w)}", soft_wrap=True, markup=True)
    err.print("[bold green]PASSED[/bold green]" if report["passed"] else "[bold red]FAILED[/bold red]", markup=True)


def print_comparison(rows: list[dict[str, Any]], title: str) -> None:
    # One column per fix, so that three or four fixes fit a terminal side by side.
    t = Table(title=title, title_justify="left")
    t.add_column("held-out")
    for name in comparison_names(rows):
        t.add_column(name, justify="right", overflow="fold")
    for name, cells in comparison_cells(rows):
        if name == "gates":
            cells = [styled({"pass": "[green]pass[/green]", "FAIL": "[red]FAIL[/red]"}.get(c, c)) for c in cells]
        t.add_row(name, *cells)
    err.print(t)


def print_run_summary(s: dict[str, Any], recipe: str, model: str) -> None:
    err.rule("summary")
    v = s["verify"]
    t = Table(title=f"mechfix run: {recipe} on {model}", title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("behaviour (all items)", f"effect {_fmt_ci(s['behaviour']['effect'])}, flip rate "
              + ("-" if s["behaviour"]["rate"] is None else f"{s['behaviour']['rate']:.0%}"))
    t.add_row("carried by", ", ".join(s["top_components"]))
    f = s["fix"]
    t.add_row("fix", f"{f['kind']} / {f['op']} on {', '.join(f['targets'])}, strength {f['strength']:g}, {f['parameters']:,} parameters")
    pr = v.get("probe")
    if pr:
        t.add_row("gate", f"probe on L{pr['layer']}: AUROC {_num(pr['auroc'])} held out; fires on "
                  + ", ".join(f"{c} {_pct(x)}" for c, x in pr["fires"].items())
                  + f", neutral tokens {_pct(pr['fires_neutral_tokens'], 1)}; without the gate: "
                  f"{_pct(pr['ungated']['reduction'])} less, KL {pr['ungated']['kl']:.4f}")
    red = v["reduction"]["value"]
    t.add_row("held-out effect", f"{_fmt_ci(v['before']['effect'])} -> {_fmt_ci(v['after']['effect'])}"
              + ("" if red is None else f"  ({red:.0%} less)"))
    ch = (s.get("steer") or {}).get("chosen") or {}
    if ch.get("cv_reduction") is not None:
        t.add_row("chosen on", f"training split: {_pct(ch['reduction'])} less (fit), {_pct(ch['cv_reduction'])} less "
                  "(cross-validated over items)")
    t.add_row("side effects", f"KL {v['kl']['value']:.4f} nats/token, clean agreement {v['clean_agreement']['value']:.0%}, "
              f"clean margin kept {_pct((v.get('clean_margin') or {}).get('kept'))}, "
              f"capabilities kept {_pct(s.get('capabilities_kept'))} (worst task), "
              + ("no helpful condition" if not v.get("helpful") else f"helpful influence removed {_pct(v['helpful'].get('loss'))}")
              + f", anti-steerable {v['anti_steerable']['share']:.0%}")
    hh = [f"{words} {harm_help_change(v.get(key), count)}" for key, count, words, _ in HARM_HELP if v.get(key)]
    if hh:
        t.add_row("harm / help", "; ".join(hh) + f"; overshoot {_pct((v.get('overshoot') or {}).get('value'))}")
    if v.get("control_change"):
        t.add_row("control", f"{v['control_change']['before']:+.2f} -> {v['control_change']['after']:+.2f} ({v['control_change']['reading']})")
    live = s.get("live_outcome")
    if live:
        b, a = live["before"]["pressure"], live["after"]["pressure"]
        state = ", ".join(f"{k} {b['final_state'][k]:.4g} -> {a['final_state'][k]:.4g}" for k in b["final_state"])
        t.add_row("live episodes (pressure)", f"after the last round {state}; the target names the misaligned option "
                  f"{b['misaligned_replies']:.0%} -> {a['misaligned_replies']:.0%}")
    t.add_row("gates", ", ".join(f"{g['name']}: " + ("pass" if g["passed"] else "FAIL") for g in v["gates"]))
    t.add_row("verdict", styled("[bold green]PASSED[/bold green]" if s["passed"] else "[bold red]FAILED[/bold red]"))
    if not s["passed"]:
        t.add_row("why", why_failed(v))
    t.add_row("artifacts", ", ".join(s["artifacts"].values()))
    err.print(t)
