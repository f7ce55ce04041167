"""The pipeline as a library: record, attribute, steer, verify and run, from Python.

Each function takes what the command of the same name reads (a recipe, an
artifact or its path, a model or its name), returns the object the command
saves, and saves it too when given ``out``. The CLI calls these functions and
only parses options, prints and writes its extra outputs::

    import mechfix

    lm = mechfix.load_model()                                   # the embedded Gemma 3 270M
    rec = mechfix.record("conformity", lm, out="conformity.rec.safetensors")
    att = mechfix.attribute(rec, lm)
    fix = mechfix.steer(att, rec, lm, kind="heads")             # a GateError when no fix keeps the budget
    report = mechfix.verify("conformity", fix, lm)
    report["passed"], report["reduction"]

    result = mechfix.run("conformity", "runs/conformity")       # all four, every artifact in the folder

Progress: every stage takes ``on_progress(phase, advance, total, key=None)``
(``total`` None: a bar of unknown length; ``key``: one bar whose ``phase`` changes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechfix.artifacts import Artifact, load_artifact, save_artifact
from mechfix.defaults import MIN_EFFECT, MIN_REDUCTION
from mechfix.engine.actstore import default_act_dtype
from mechfix.errors import ArtifactError, BadInputError, GateError
from mechfix.fixes.fix import Fix, fix_from_artifact, load_fix, save_fix
from mechfix.fixes.gate import GateSettings
from mechfix.measure import capabilities as caps
from mechfix.measure.evaluate import NeutralSet, neutral_passages, neutral_set
from mechfix.measure.verdict import comparison_rows
from mechfix.models import LoadedModel, load_model
from mechfix.scenario.chat import Style, choose_style
from mechfix.scenario.recipe import LoadedRecipe, load_recipe
from mechfix.stages import attribute as attribute_stage
from mechfix.stages import record as record_stage
from mechfix.stages import remedies
from mechfix.stages import steer as steer_stage
from mechfix.stages import verify as verify_stage
from mechfix.stages.attribution import to_artifact as attribution_artifact
from mechfix.stages.lora import LoraSettings
from mechfix.textio import clean_nan, json_text, write_text_atomic

# ``(phase, advance, total, key=None)``: see the module's docstring.
Progress = Callable[..., None]
# A fresh progress callback for each stage of a run (the CLI opens one set of bars per stage).
ProgressFactory = Callable[[], AbstractContextManager[Progress | None]]


def _quiet() -> AbstractContextManager[None]:
    return nullcontext(None)


def as_model(model: LoadedModel | str | None) -> LoadedModel:
    """A loaded model as it is, or one loaded by name (None: the embedded default) on the hooks backend."""
    return model if isinstance(model, LoadedModel) else load_model(model)


def as_recipe(recipe: LoadedRecipe | str | Path, mode: str | None = None) -> LoadedRecipe:
    """A loaded recipe as it is, or a recipe file or built-in name, loaded (in ``mode`` when given)."""
    return recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe, mode)


def as_style(lm: LoadedModel, loaded: LoadedRecipe, style: Style | str | None, chat_template: str | None = None) -> Style:
    """A chosen rendering style as it is, or the one :func:`~mechfix.scenario.chat.choose_style` picks."""
    return style if isinstance(style, Style) else choose_style(lm.tokenizer, loaded.recipe, style, chat_template)


def run_params(lm: LoadedModel, **kw: Any) -> dict[str, Any]:
    """A stage's parameters as recorded in its artifact, plus where and how it ran."""
    where: dict[str, Any] = {"device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."), "backend": lm.backend}
    if lm.remote:
        where["remote"] = "NDIF" if lm.remote is True else f"{lm.remote} (simulated)"
    if getattr(lm.model, "hf_device_map", None) and len(set(lm.model.hf_device_map.values())) > 1:
        where["device_map"] = {k: str(v) for k, v in lm.model.hf_device_map.items()}
    return {**kw, **where}


def neutral_text(lm: LoadedModel, path: str | Path | None = None, part: str = "select", stride: int = 1) -> NeutralSet:
    """The neutral passages KL is measured on: a text file of passages, or the built-in ``part``.

    Raises:
        BadInputError: When the file is missing or holds no text.
    """
    if path is not None and not Path(path).is_file():
        raise BadInputError(f"--neutral '{path}' does not exist. Give a text file of passages separated by blank lines.")
    neutral = neutral_set(lm, neutral_passages(str(path) if path else None, part), stride)
    if neutral.n_tokens == 0:
        raise BadInputError(f"--neutral '{path}' holds no text to measure KL on. Give passages separated by blank lines.")
    return neutral


def find_recording(att: Artifact, record: str | Path | None = None) -> Artifact:
    """The recording an attribution was made from: ``record``, the recorded path, or its name beside the attribution.

    Raises:
        ArtifactError: When it cannot be found, or ``record`` is another recording.
    """
    inp = att.manifest.get("inputs", {}).get("record", {})
    if record is None:
        named = Path(str(inp.get("path", "")))
        beside = Path(att.path or ".").parent / named.name
        record = next((p for p in (named, beside) if str(p) and p.is_file()), None)
        if record is None:
            raise ArtifactError(
                f"cannot find the recording '{inp.get('path')}' that '{att.path}' was made from. "
                "Pass it with --record REC.safetensors."
            )
    rec = load_artifact(record, expect="record")
    if inp.get("sha256") and rec.sha256 != inp["sha256"]:
        raise ArtifactError(
            f"'{record}' is not the recording '{att.path}' was made from (its sha256 differs). Pass the right one "
            "with --record, or run `mechfix attribute` again on this recording."
        )
    return rec


def record(
    recipe: LoadedRecipe | str | Path,
    model: LoadedModel | str | None = None,
    *,
    batch_size: int = 16,
    all_positions: bool = False,
    style: Style | str | None = None,
    chat_template: str | None = None,
    act_dtype: Any = None,
    out: str | Path | None = None,
    on_progress: Progress | None = None,
) -> Artifact:
    """Run every item of a recipe under every condition: the recording artifact (saved to ``out`` when given).

    Args:
        recipe: A recipe file, a built-in name, or a loaded recipe.
        model: A loaded model, a model name, or None for the embedded default.
        batch_size: Sequences per forward pass.
        all_positions: Keep activations at every prompt position, not only the decision's.
        style: ``text``, ``chat``, a chosen style, or None (chat when the model has a template).
        chat_template: A built-in template name or a Jinja file, for ``chat``.
        act_dtype: The dtype activations are kept in (default: float16 on a GPU, float32 here).
        out: Where to save the recording (its activations at every position stream to that folder).
        on_progress: Progress callback.
    """
    lm, loaded = as_model(model), as_recipe(recipe)
    act_dtype = act_dtype or default_act_dtype(lm)
    # Activations at every position stream to the disk the artifact goes to (not to a RAM-backed /tmp).
    act_dir = Path(out).resolve().parent if out is not None else None
    rec = record_stage.record(lm, loaded.recipe, batch_size=batch_size, all_positions=all_positions, on_progress=on_progress,
                              style=as_style(lm, loaded, style, chat_template), act_dtype=act_dtype, act_dir=act_dir)
    artifact = record_stage.to_artifact(rec, lm, loaded, run_params(lm, batch_size=batch_size, all_positions=all_positions,
                                                                     act_dtype=str(act_dtype).removeprefix("torch.")))
    if out is not None:
        save_artifact(out, artifact)
    return artifact


def attribute(
    recording: Artifact | str | Path,
    model: LoadedModel | str | None = None,
    *,
    method: str = "both",
    top: int = 10,
    baseline: str = "clean",
    batch_size: int = 16,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    on_progress: Progress | None = None,
) -> Artifact:
    """Rank components by their causal share of the recorded behaviour: the attribution artifact.

    Args:
        recording: A recording artifact or its path.
        model: The model it was recorded on (loaded, by name, or None for the embedded default).
        method: ``atp`` (attribution patching), ``exact`` (activation patching) or ``both``.
        top: Components listed in the summary.
        baseline: The condition whose activations are restored: ``clean`` or ``control``.
        batch_size: Rows per pass.
        out: Where to save the attribution.
        plot: Where to save the layer-by-head heatmap (a PNG).
        on_progress: Progress callback.
    """
    lm = as_model(model)
    rec = recording if isinstance(recording, Artifact) else load_artifact(recording, expect="record")
    att = attribute_stage.attribute(lm, rec, method=method, top=top, baseline=baseline, batch_size=batch_size,
                                    on_progress=on_progress)
    params = run_params(lm, method=method, top=top, baseline=baseline, batch_size=batch_size)
    artifact = attribution_artifact(att, lm, rec, params, top=top)
    if out is not None:
        save_artifact(out, artifact)
    if plot is not None:
        from mechfix.report.plot import heatmap

        heatmap(artifact.tensors, plot,
                title=f"{artifact.manifest.get('recipe')} on {lm.identity['name']}: effect of restoring {baseline}",
                label="score removed (nats)")
    return artifact


def steer(
    attribution: Artifact | str | Path,
    recording: Artifact | str | Path | None = None,
    model: LoadedModel | str | None = None,
    *,
    kind: str = "heads",
    op: str | None = None,
    top_heads: int = steer_stage.DEFAULT_TOP_HEADS,
    layers: Sequence[int] | None = None,
    strengths: Sequence[float] | None = None,
    budget: steer_stage.Budget | None = None,
    min_effect: float = MIN_EFFECT,
    neutral: str | Path | None = None,
    capabilities: Sequence[str] | None = None,
    folds: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    lora: LoraSettings | None = None,
    gate: GateSettings | None = None,
    portable: bool = False,
    out: str | Path | None = None,
    on_progress: Progress | None = None,
) -> Artifact:
    """Turn an attribution into a fix, chosen by what carries over to items it was not fitted on: the fix artifact.

    Args:
        attribution: An attribution artifact or its path.
        recording: The recording it was made from (default: found from the attribution's manifest).
        model: The model both were made on.
        kind: ``heads``, ``vector`` or ``lora``.
        op: The fix operation (default per kind).
        top_heads: Heads (or layers) the fix may use.
        layers: Restrict the fix to these layers.
        strengths: The coarse strength grid (default per operation).
        budget: Side-effect limits a fix must keep (default: mechfix's defaults).
        min_effect: The smallest training-split effect (nats) worth a fix; below it steer refuses.
        neutral: A text file of neutral passages for KL (default: the built-in set).
        capabilities: Capability task files (default: the built-in suite).
        folds: Cross-validation folds over the training items.
        seed: Seed for folds and training.
        batch_size: Rows per pass.
        lora: LoRA training settings (``kind="lora"``).
        gate: Probe gate settings, or None for an always-on fix.
        portable: Only operations that export exactly as weights.
        out: Where to save the fix (a folder for a LoRA fix).
        on_progress: Progress callback.

    Raises:
        GateError: No candidate keeps the budget; ``detail`` holds what was measured.
    """
    lm = as_model(model)
    att = attribution if isinstance(attribution, Artifact) else load_artifact(attribution, expect="attribution")
    rec = recording if isinstance(recording, Artifact) else find_recording(att, recording)
    budget = budget or steer_stage.Budget()
    lora = lora or LoraSettings()
    tasks = caps.load_tasks(capabilities)
    kl_set = neutral_text(lm, neutral, "select", steer_stage.SEARCH_KL_STRIDE)
    suite = caps.build_suite(lm, tasks, "select")
    report = on_progress or (lambda *a, **k: None)

    def on_train(step: int, losses: dict[str, float]) -> None:
        report(f"training the LoRA fix and one per fold (loss {losses['loss']:.3f}: behaviour {losses['behaviour']:.3f}, "
               f"helpful {losses.get('helpful', 0.0):.3f}, KL {losses['kl']:.4f})", 1, losses.get("total", lora.steps),
               key="train")

    def on_step(label: str) -> None:
        report(f"choosing the fix (measured {label})", 1, None, key="sweep")

    steering = steer_stage.steer(lm, att, rec, kl_set, kind=kind, op=op, top=top_heads, layers=layers, strengths=strengths,
                                 budget=budget, batch_size=batch_size, on_step=on_step, lora=lora, on_train=on_train,
                                 capabilities=suite, folds=folds, seed=seed, gate=gate, portable=portable,
                                 min_effect=min_effect)
    extra: dict[str, Any] = {"lora": {k: getattr(lora, k) for k in ("rank", "steps", "lr", "kl_weight", "helpful_weight", "scope", "seed")}} \
        if kind == "lora" else {}
    if gate is not None:
        extra["gate"] = {"probe": True, "layer": gate.layer, "max_clean_fire": gate.max_clean_fire,
                         "max_neutral_fire": gate.max_neutral_fire, "l2": gate.l2}
    params = run_params(lm, kind=kind, op=op, top_heads=top_heads, layers=layers, strengths=strengths, **budget.as_dict(),
                        neutral=str(neutral) if neutral else "builtin:select", capabilities=list(capabilities or ["builtin"]),
                        folds=folds, seed=seed, batch_size=batch_size, portable=portable, **extra)
    artifact = steer_stage.to_artifact(steering, lm, att, rec, params)
    if out is not None:
        save_fix(out, artifact)
    return artifact


def verify_all(
    recipe: LoadedRecipe | str | Path,
    fixes: Sequence[Fix | Artifact | str | Path],
    model: LoadedModel | str | None = None,
    *,
    gates: list | None = None,
    neutral: str | Path | None = None,
    capabilities: Sequence[str] | None = None,
    batch_size: int = 16,
    replay: str = "all",
    style: Style | str | None = None,
    chat_template: str | None = None,
    on_progress: Progress | None = None,
    baselines: bool = False,
    prompt_fix: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Prove fixes on the recipe's held-out split: one verify report per fix (see :func:`verify`).

    With ``baselines`` (or a ``prompt_fix`` file, the prompt remedy's
    instruction), the remedies of :mod:`mechfix.stages.remedies` are measured
    too, on the same decisions with the same gates: their reports follow the
    fixes', each with a ``remedy`` block.
    """
    lm, loaded = as_model(model), as_recipe(recipe)
    fixes = [f if isinstance(f, Fix) else fix_from_artifact(f) if isinstance(f, Artifact) else load_fix(f) for f in fixes]
    rendering = as_style(lm, loaded, style, chat_template)
    gates = gates if gates is not None else verify_stage.default_gates()
    kl_set = neutral_text(lm, neutral, "verify")
    suite = caps.build_suite(lm, caps.load_tasks(capabilities), "verify")
    rems = remedies.baselines(remedies.instruction_text(str(prompt_fix)) if prompt_fix is not None else None) \
        if baselines or prompt_fix is not None else []
    reports = verify_stage.verify_fixes(lm, loaded.recipe, fixes, kl_set, gates=gates, batch_size=batch_size, replay=replay,
                                        capabilities=suite, on_progress=on_progress, style=rendering, remedies=rems)
    out = []
    for fix, report in zip(fixes, reports):
        trained_on = fix.manifest.get("inputs", {}).get("recipe", {}).get("sha256")
        report["recipe"] = {"name": loaded.recipe.name, "path": loaded.path, "sha256": loaded.sha256,
                            "same_as_training": trained_on == loaded.sha256 if trained_on else None}
        if trained_on and trained_on != loaded.sha256:
            report["warnings"].append(
                "this recipe differs from the one the fix was made from: its held-out split is not the one steer left out."
            )
        report["fix"] = {"path": fix.path, "kind": fix.kind, "op": fix.op, "targets": fix.targets, "strength": fix.strength,
                         "sha256": fix.sha256}
        report["model"] = lm.identity["name"]
        report["style"] = rendering.as_dict()
        out.append(clean_nan(report))
    for report in reports[len(fixes):]:  # the remedies: the same model and renderings
        report.update(model=lm.identity["name"], style=rendering.as_dict())
    return out + [clean_nan(r) for r in reports[len(fixes):]]


def verify(
    recipe: LoadedRecipe | str | Path,
    fix: Fix | Artifact | str | Path,
    model: LoadedModel | str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Prove a fix on the recipe's held-out episodes: behaviour before and after, side effects, and the gates.

    Args:
        recipe: The recipe the fix was made from (a file, a built-in name, or loaded).
        fix: A fix, its artifact, or its file (a folder for a LoRA fix).
        model: The model it was made on.
        **options: As for :func:`verify_all`: ``gates`` (default: mechfix's), ``neutral``,
            ``capabilities``, ``batch_size``, ``replay``, ``style``, ``chat_template``, ``on_progress``,
            ``baselines``, ``prompt_fix``.

    Returns:
        The verify report (``passed``, ``reduction``, ``kl``, ``gates``, ...), as ``NAME.verify.json`` holds it;
        with baselines, their reports under ``baselines`` and every column under ``comparison``.
    """
    return with_comparison(*verify_all(recipe, [fix], model, **options))


def with_comparison(report: dict[str, Any], *others: dict[str, Any]) -> dict[str, Any]:
    """The first fix's report with the other fixes (``compare``), the remedies (``baselines``) and their table.

    Args:
        report: The first fix's report (its gates decide the exit code).
        *others: What :func:`verify_all` returned after it: other fixes' reports, then the remedies'.
    """
    compared = [r for r in others if "remedy" not in r]
    base = [r for r in others if "remedy" in r]
    if compared:
        report["compare"] = compared
    if base:
        report["baselines"] = base
    if others:
        report["comparison"] = comparison_rows([report, *compared, *base])
    return report


@dataclass
class RunResult:
    """What :func:`run` made.

    Attributes:
        recording: The recording artifact.
        attribution: The attribution artifact.
        fix: The fix artifact, or None when steer found none within the budget.
        report: The verify report, or None without a fix.
        paths: What each output is called in the run's folder (``record``, ``attribution``,
            ``plot``, ``fix``, ``verify``, ``report``).
        steer_error: Why steer found no fix (then the page still shows the diagnosis).
    """

    recording: Artifact
    attribution: Artifact
    fix: Artifact | None = None
    report: dict[str, Any] | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    steer_error: GateError | None = None

    @property
    def passed(self) -> bool:
        """Whether a fix was made and passed every gate."""
        return bool(self.report and self.report["passed"])


def fix_path(stem: str | Path, kind: str) -> Path:
    """Where a fix named ``stem`` goes: STEM.fix.safetensors, or the folder STEM.lora for a LoRA fix."""
    stem = Path(stem)
    return stem.with_name(f"{stem.name}.lora" if kind == "lora" else f"{stem.name}.fix.safetensors")


def run_paths(out: str | Path, name: str, kind: str, report: bool = True) -> dict[str, Path]:
    """The files a run writes into ``out`` for recipe ``name``."""
    stem = Path(out) / name
    return {
        **{k: Path(f"{stem}{suffix}") for k, suffix in (
            ("record", ".rec.safetensors"), ("attribution", ".attr.safetensors"), ("plot", "-heads.png"))},
        "fix": fix_path(stem, kind),
        "verify": Path(f"{stem}.verify.json"),
        **({"report": Path(f"{stem}.report.html")} if report else {}),
    }


def write_report(paths: dict[str, Path]) -> Path | None:
    """The run's page from the artifacts it wrote (None when it writes none)."""
    if "report" not in paths:
        return None
    from mechfix.report import collect, render

    made = [p for k, p in paths.items() if k in ("record", "attribution", "fix", "verify") and p.exists()]
    write_text_atomic(paths["report"], render(collect(made)))
    return paths["report"]


def run(
    recipe: LoadedRecipe | str | Path,
    out: str | Path,
    model: LoadedModel | str | None = None,
    *,
    mode: str | None = None,
    kind: str = "heads",
    op: str | None = None,
    top_heads: int = steer_stage.DEFAULT_TOP_HEADS,
    layers: Sequence[int] | None = None,
    baseline: str = "clean",
    budget: steer_stage.Budget | None = None,
    min_reduction: float = MIN_REDUCTION,
    neutral: str | Path | None = None,
    capabilities: Sequence[str] | None = None,
    folds: int = 5,
    seed: int = 0,
    lora: LoraSettings | None = None,
    gate: GateSettings | None = None,
    portable: bool = False,
    batch_size: int = 16,
    replay: str = "all",
    style: Style | str | None = None,
    chat_template: str | None = None,
    report: bool = True,
    baselines: bool = False,
    prompt_fix: str | Path | None = None,
    progress: ProgressFactory = _quiet,
    on_stage: Callable[[str, Any], None] | None = None,
) -> RunResult:
    """Record, attribute, steer and verify in one go; every artifact goes into the folder ``out``.

    Writes NAME.rec.safetensors, NAME.attr.safetensors, NAME-heads.png, the fix
    (NAME.fix.safetensors, or the folder NAME.lora), NAME.verify.json and, with
    ``report``, NAME.report.html. Options are those of the stages; the budget's
    limits are also verify's gates, with ``min_reduction``.

    Args:
        baselines: Also verify the remedies of :mod:`mechfix.stages.remedies` beside the fix
            (``prompt_fix``: the prompt remedy's instruction file; it implies ``baselines``).
        progress: Opens a progress callback for each stage (default: none).
        on_stage: Called as ``(stage, None)`` when a stage starts and ``(stage, what it made)``
            when it ends (an artifact; verify's report), for printing between stages.

    Returns:
        The artifacts and report; a run whose steer found no fix returns with ``steer_error`` set.
    """
    lm, loaded = as_model(model), as_recipe(recipe, mode)
    budget = budget or steer_stage.Budget()
    rendering = as_style(lm, loaded, style, chat_template)
    paths = run_paths(out, loaded.recipe.name, kind, report)
    Path(out).mkdir(parents=True, exist_ok=True)
    said = on_stage or (lambda stage, made: None)

    said("record", None)
    with progress() as p:
        rec = record(loaded, lm, batch_size=batch_size, style=rendering, out=paths["record"], on_progress=p)
    said("record", rec)
    said("attribute", None)
    with progress() as p:
        att = attribute(rec, lm, method="both", top=10, baseline=baseline, batch_size=batch_size, out=paths["attribution"],
                        plot=paths["plot"], on_progress=p)
    said("attribute", att)
    said("steer", None)
    try:
        with progress() as p:
            fix = steer(att, rec, lm, kind=kind, op=op, top_heads=top_heads, layers=layers, budget=budget, neutral=neutral,
                        capabilities=capabilities, folds=folds, seed=seed, batch_size=batch_size, lora=lora, gate=gate,
                        portable=portable, out=paths["fix"], on_progress=p)
    except GateError as exc:
        # No fix to verify: the page still shows the diagnosis.
        write_report(paths)
        return RunResult(rec, att, paths=paths, steer_error=exc)
    said("steer", fix)
    said("verify", None)
    gates = verify_stage.budget_gates(budget, min_reduction)
    with progress() as p:
        verdict = verify(loaded, fix, lm, gates=gates, neutral=neutral, capabilities=capabilities, batch_size=batch_size,
                         replay=replay, style=rendering, on_progress=p, baselines=baselines, prompt_fix=prompt_fix)
    write_text_atomic(paths["verify"], json_text(verdict) + "\n")
    said("verify", verdict)
    write_report(paths)
    return RunResult(rec, att, fix, verdict, paths)
