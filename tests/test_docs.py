"""The manual: built strictly, its command reference made from the command line, its commands real, its links inside."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from mechfix.cli import _click_classes, app
from mechfix.cli.reference import pages

# A usage error is a ClickException, from click or from the click that newer typer vendors (the CLI's own lookup);
# --help ends parsing with an Exit, from either too.
_USAGE, _ = _click_classes()
_EXIT = (click.exceptions.Exit, typer.Exit)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference" / "cli"
# Every Markdown page people read: the manual, and the pages at the top of the repository and its folders.
PAGES = sorted({p.resolve() for p in DOCS.rglob("*.md")} | {ROOT / n for n in ("README.md", "CHANGELOG.md", "SECURITY.md")}
               | {ROOT / "recipes" / "README.md", ROOT / "benchmarks" / "README.md"})
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Words that only make sense to whoever wrote them: a reader cannot follow a date-less "today" or a machine.
UNFOLLOWABLE = re.compile(r"\btoday\b|\bthis\s+machine\b|\bprevious\s+release\b|\bthe\s+issue\b|\.\./shared", re.I)


# Terms the manual uses before a reader may know them (a pattern each, its variants included): the first use on a
# page links to its glossary entry.
TERMS = {
    "KL": "kl", "nats": "score", "scores?": "score", "anti-steerable": "anti-steerable", "NDIF": "backends-and-ndif",
    "overshoot": "overshoot", "gates?": "gate", "held[ -]out": "split-and-folds", "folds?": "split-and-folds",
    "budget": "budget", "harm": "harm-and-help", "(?<!side )effects?": "effect", r"L\d+\.H\d+": "components",
}


def _first_use(text: str, term: str) -> tuple[tuple[int, int], bool] | None:
    """Where a term (a pattern) is first used in a page's prose (not in code, a heading or a link's address), and
    whether that use is a link to its glossary entry; None when the page does not use it."""
    skip = [m.span() for m in re.finditer(r"(?s:^```.*?^```)|`[^`\n]*`|^#[^\n]*|\]\([^)]*\)|(?s:<!--.*?-->)", text, re.M)]
    for m in re.finditer(rf"(?<![\w.-])(?:{term})(?![\w-]|\.\w)", text):
        if any(a <= m.start() < b for a, b in skip):
            continue
        # Linked: the use lies in a link's text ("[harm and help](…concepts.md#harm-and-help)") to the term's entry.
        opened = re.search(r"\[[^\[\]]*$", text[:m.start()])
        closes = re.match(rf"[^\[\]]*\]\([^)]*concepts\.md#{TERMS.get(term, '')}\)", text[m.end():])
        return m.span(), opened is not None and closes is not None
    return None


def _prose(text: str) -> str:
    """A page without its code blocks (examples may say anything)."""
    return FENCE.sub("", text)


def _commands(text: str) -> list[str]:
    """The ``mechfix …`` command lines in a page's shell code blocks, continuation lines joined."""
    found = []
    for lang, body in FENCE.findall(text):
        if lang not in ("bash", "sh", "console", "shell"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line.strip().removeprefix("$ "))  # a comment may hold anything
            # A command may follow an install in the same line: `pip install ... && mechfix run ...`.
            for part in re.split(r"&&|;|\|", line):
                part = part.strip()
                if part.startswith("mechfix "):
                    found.append(part)
    return found


def _parse(line: str) -> str | None:
    """Parse one command line with the real command line, running nothing: None, or what is wrong with it."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = []
    for w in lexer:
        if w and w[0] in "<>":
            break  # a redirection ends the arguments
        words.append(w)
    group = typer.main.get_command(app)
    try:
        ctx = group.make_context("mechfix", words[1:], resilient_parsing=False)
        rest = [*getattr(ctx, "protected_args", getattr(ctx, "_protected_args", [])), *ctx.args]
        name, cmd, args = group.resolve_command(ctx, rest)
        cmd.make_context(name, args, parent=ctx)
    except _EXIT:
        return None  # --help
    except _USAGE as e:
        return e.format_message()
    return None


def test_the_command_reference_pages_are_what_the_command_line_says_now():
    made = pages()
    assert sorted(p.name for p in REFERENCE.glob("*.md")) == sorted(made)
    stale = [name for name, text in made.items() if (REFERENCE / name).read_text(encoding="utf-8") != text]
    assert not stale, f"stale pages {stale}: run `python -m mechfix.cli.reference docs/reference/cli`"


def test_every_command_has_a_reference_page_with_every_option_it_takes():
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        page = (REFERENCE / f"{name}.md").read_text(encoding="utf-8")
        for param in cmd.params:
            if param.param_type_name == "option" and not param.hidden:
                assert f"{param.opts[-1]}" in page, (name, param.opts)


def test_the_manual_builds_strictly(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(site)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (site / "reference" / "cli" / "steer" / "index.html").exists()
    assert (site / "concepts" / "index.html").read_text(encoding="utf-8").count('id="gate"') == 1


def test_every_mechfix_command_in_the_docs_parses_with_the_real_command_line():
    lines = [(p, c) for p in PAGES for c in _commands(p.read_text(encoding="utf-8"))]
    assert len(lines) > 50  # the manual is full of them; far fewer means the blocks were not read
    wrong = [f"{p.relative_to(ROOT)}: {c}\n  -> {why}" for p, c in lines if (why := _parse(c))]
    assert not wrong, "\n".join(wrong)


def test_the_parser_the_docs_test_uses_refuses_an_unknown_option_and_an_unknown_command():
    assert _parse("mechfix run recipes/conformity.yaml --out x") is None
    assert "--colour" in _parse("mechfix run recipes/conformity.yaml --out x --colour red")
    assert _parse("mechfix frobnicate x") is not None
    assert _parse("mechfix verify conformity --fix f.safetensors > out.json  # a comment") is None


def test_no_page_links_out_of_the_repository():
    bad = []
    for page in PAGES:
        text = _prose(page.read_text(encoding="utf-8"))
        if re.search(r"https?://", text):
            bad.append(f"{page.relative_to(ROOT)}: a web address")
        for target in LINK.findall(text):
            path = target.split("#", 1)[0]
            if not path:
                continue
            resolved = (page.parent / path).resolve()
            if ROOT not in resolved.parents or not resolved.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_speaks_of_today_this_machine_or_the_issue(page):
    text = _prose(page.read_text(encoding="utf-8"))
    found = [m.group(0) for m in UNFOLLOWABLE.finditer(text)]
    assert not found, found


def test_the_front_page_stays_short():
    words = len(_prose((ROOT / "README.md").read_text(encoding="utf-8")).split())
    assert words <= 1500, words


# The glossary itself, the generated reference and the changelog (a record of changes, not a place to learn) aside.
@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in ("concepts.md", "CHANGELOG.md") and "cli" not in p.parts],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_a_term_s_first_use_on_a_page_links_to_its_glossary_entry(page):
    text = page.read_text(encoding="utf-8")
    unlinked = [term for term in TERMS if (hit := _first_use(text, term)) is not None and not hit[1]]
    assert not unlinked, unlinked


def test_the_glossary_check_finds_a_plain_use_past_code_and_headings_and_knows_a_linked_one():
    text = "# KL\n\n`KL` in code, then KL here and [KL](concepts.md#kl) later.\n"
    (start, end), linked = _first_use(text, "KL")
    assert start == text.index("then KL") + len("then ") and not linked
    assert _first_use("See [KL](../concepts.md#kl), then KL.", "KL")[1]
    assert _first_use("```\nKL\n```\nnothing else", "KL") is None
    assert _first_use("the [harm and help](concepts.md#harm-and-help) split", "harm")[1]
    assert not _first_use("the [harm](concepts.md#kl) split", "harm")[1]  # a link to another entry is not its entry
    assert _first_use("side effects here, then the effects", "(?<!side )effects?")[0][0] == len("side effects here, then the ")
    assert _first_use("gates and [gate](concepts.md#gate)", "gates?")[1] is False


NESTED = re.compile(r"\[[^\[\]]*\[[^\[\]]*\]\([^)]*\)[^\[\]]*\]\(")


def test_no_link_sits_inside_another_link_s_text():
    nested = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in PAGES for m in NESTED.finditer(_prose(p.read_text(encoding="utf-8")))]
    assert not nested, nested
    assert NESTED.search("[big models and [NDIF](concepts.md#x)](howto/models.md)")


# A measured number: a bootstrap interval, a KL per token, a held-out reduction. They live on the results pages.
MEASURED = re.compile(r"\[[-−+]?\d+(?:\.\d+)?%?, [-−+]?\d+(?:\.\d+)?%?\]|\d\.\d+ nats/token|\d+% (?:less|held out)")
GUIDES = [p for p in PAGES if "results" not in p.parts and "cli" not in p.parts and p.name != "CHANGELOG.md"
          and p.parent.name not in ("recipes", "benchmarks")]


@pytest.mark.parametrize("page", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_measured_numbers_live_on_the_results_pages_only(page):
    found = [m.group(0) for m in MEASURED.finditer(_prose(page.read_text(encoding="utf-8")))]
    assert not found, f"move these to docs/results/ and link there: {found}"


def test_the_measured_number_check_knows_an_interval_a_kl_and_a_reduction():
    for text in ("+5.32 [+4.46, +6.20]", "21% [9%, 32%]", "KL 0.0699 nats/token", "removes 36% held out"):
        assert MEASURED.search(text), text
    assert not MEASURED.search("`--max-kl` (0.1) and `--min-reduction` (0.5)")
