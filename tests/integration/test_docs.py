"""Docs a user can follow: every citation points at something a user can open, recipe headers run.

Citations of private notes (the digest files this project was planned from) must not ship: a user
cannot open them. Recipe headers are copied into terminals, so each header command must name the
recipe it sits in.

The README is a front door of at most 150 lines that links every page of docs/; every relative link in
the README, docs/ and the benchmarks' READMEs points at a file (and heading) that exists; benchmark
commands are written in the package's `python -m benchmarks.<module>` form.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The forbidden names are assembled here so that this file does not match itself.
PRIVATE = [".".join(["umt", "md"]), "-".join(["prior", "art"]), "/".join(["..", "shared"]),
           "/".join(["", "work", "shared"])]
SHIPPED = ("umt_distill", "recipes", "tests", "benchmarks", "cache", "docs")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json"}


def _shipped_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "pyproject.toml", REPO / "Makefile"]
    for top in SHIPPED:
        files += [p for p in (REPO / top).rglob("*") if p.is_file() and p.suffix in SUFFIXES]
    return files


def test_no_citation_of_files_outside_the_project():
    hits = []
    for path in _shipped_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(name in line for name in PRIVATE):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not hits, "cite the paper or the official code file instead:\n" + "\n".join(hits)


def test_readme_defines_the_code_citation():
    readme = (REPO / "README.md").read_text()
    assert "UMT code @4fb4049" in readme
    assert "4fb4049f5a87919882e68ccc427615ae7dab1c33" in readme
    assert "2303.16058" in readme


def test_recipe_header_commands_name_their_own_recipe():
    wrong = []
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        name = path.relative_to(REPO / "recipes").with_suffix("").as_posix()
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
        used = re.findall(r"(?:umt_distill|umt-distill) (?:cache-teacher|train|eval|validate) (\S+)",
                          "\n".join(header))
        wrong += [f"{name}: header runs {u}" for u in used if u != name]
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------------------------------
# The README is a front door; the rest lives in docs/ and every link in them resolves.

README_MAX_LINES = 150
LINKED_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
               REPO / "benchmarks" / "results" / "NOTES.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, flags=re.M)}


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto:


def test_readme_is_a_short_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_links_every_doc():
    linked = {(REPO / t.split("#")[0]).resolve() for t in _relative_links(REPO / "README.md") if t.split("#")[0]}
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert (REPO / "docs").is_dir() and not missing, f"README.md does not link docs/{missing}"


def test_relative_links_point_at_existing_files():
    broken = []
    for doc in LINKED_DOCS:
        for target in _relative_links(doc):
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            where = f"{doc.relative_to(REPO)}: ({target})"
            if not dest.is_file():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: no heading #{anchor}")
    assert not broken, "\n".join(broken)


def test_benchmark_commands_use_the_module_form():
    """`benchmarks` is a package run as `python -m benchmarks.run`; the script form is gone from the docs."""
    script = re.compile(r"python3?\s+(?:\./)?benchmarks/\w+\.py")
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "benchmarks" / "README.md",
             *(REPO / "benchmarks").glob("*.py")]
    hits = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in files
            for n, line in enumerate(p.read_text().splitlines(), 1) if script.search(line)]
    assert not hits, "write python -m benchmarks.<module> instead:\n" + "\n".join(hits)


def _doc_commands() -> list[tuple[str, str, list[str]]]:
    """Every concrete `umt-distill cache-teacher|train|validate RECIPE k=v ...` line of the README, docs/
    and the recipe headers (torchrun launches included): (where, recipe, overrides)."""
    pattern = re.compile(r"(?:umt-distill|-m umt_distill) (?:cache-teacher|train|validate) (\S+)((?: [\w.]+=\S+)*)")
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "recipes").rglob("*.yaml"))]
    found = []
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in pattern.finditer(line):
                recipe = m.group(1)
                if recipe.isupper() or recipe.startswith(("RECIPE", "<")):
                    continue  # a placeholder in a usage line
                found.append((f"{path.relative_to(REPO)}:{n}", recipe.rstrip("`"), m.group(2).split()))
    return found


def test_every_documented_command_names_a_recipe_and_keys_that_exist():
    """What a user copies from the docs resolves: the recipe exists and every key=value is a valid key."""
    from umt_distill.config import RecipeError, check_parts, load_recipe

    commands = _doc_commands()
    assert len(commands) >= 10, commands
    bad = []
    for where, recipe, overrides in commands:
        try:
            check_parts(load_recipe(recipe, [o.rstrip("`") for o in overrides]))
        except RecipeError as e:
            bad.append(f"{where}: {recipe} {' '.join(overrides)}: {str(e).splitlines()[0]}")
    assert not bad, "\n".join(bad)
