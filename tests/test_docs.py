"""Docs a user can follow: every citation points at something a user can open, recipe headers run.

Citations of private notes (the digest files this project was planned from) must not ship: a user
cannot open them. Recipe headers are copied into terminals, so each header command must name the
recipe it sits in.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The forbidden names are assembled here so that this file does not match itself.
PRIVATE = [".".join(["umt", "md"]), "-".join(["prior", "art"]), "/".join(["..", "shared"]),
           "/".join(["", "work", "shared"])]
SHIPPED = ("umt_distill", "recipes", "tests", "benchmarks", "cache")
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
