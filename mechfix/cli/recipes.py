"""``mechfix recipes``: list the built-in recipes."""

from __future__ import annotations

from rich.table import Table

from mechfix.cli.common import JsonOpt, emit_json, app, out


@app.command(epilog="Examples:\n\n  mechfix recipes\n\n  mechfix recipes --json")
def recipes(as_json: JsonOpt = False) -> None:
    """List the built-in recipes, one line each."""
    from mechfix.scenario.recipe import builtin_recipes, load_recipe

    rows = []
    for p in builtin_recipes():
        r = load_recipe(p).recipe
        rows.append(
            {
                "name": r.name,
                "family": r.family,
                "items": len(r.items),
                "rounds": r.rounds.count if r.rounds else None,  # None: one decision per item
                "conditions": r.condition_names,
                "mode": r.mode,
                "path": str(p),
                "description": r.description,
            }
        )
    if as_json:
        emit_json({"recipes": rows})
        return
    t = Table()
    for col in ("name", "family", "items", "rounds", "conditions", "description"):
        t.add_column(col)
    for r in rows:
        rounds = f"{r['rounds']} (live)" if r["rounds"] else "-"
        t.add_row(r["name"], r["family"], str(r["items"]), rounds, ", ".join(r["conditions"]), r["description"])
    out.print(t)
