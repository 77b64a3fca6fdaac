"""The README and docs/ as a contract: the README stays a guide of at most 20,000 bytes, every
relative link resolves inside the repository (none into out/, which git ignores), every function
the README's Algorithm 1 table names exists, the README's two result tables are copies of
docs/results.md's, and no page cites the specification (SPEC.md is not in the repository)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAP_HEADING = "## How the code maps to the paper"
RESULT_HEADER = "| model | gold mean | win rate vs SFT | annotation ratio | time |"


def pages() -> list[Path]:
    """The README, docs/*.md and every README under experiments/."""
    return [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("**/README.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def links(text: str) -> list[str]:
    """Targets of inline links and images, outside code."""
    return [m.group(1) for line in prose_lines(text) for m in re.finditer(r"\]\(([^)\s]+)\)", line)]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page offers: its headings' (numbered as GitHub numbers repeats) and its
    explicit ones, <a name="..."> or <a id="...">."""
    text = path.read_text()
    found, seen = set(re.findall(r"<a (?:name|id)=\"([^\"]+)\"", text)), {}
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def test_readme_is_at_most_20000_bytes():
    assert len(README.read_bytes()) <= 20_000


def test_relative_links_resolve_inside_the_repository():
    checked = 0
    for page in pages():
        for target in links(page.read_text()):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            assert resolved.is_relative_to(ROOT), f"{where} leaves the repository"
            assert not resolved.is_relative_to(ROOT / "out"), f"{where} points into out/, which git ignores"
            assert resolved.exists(), f"{where} does not exist"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), f"{where}: no such heading or anchor"
            checked += 1
    assert checked >= 20  # the pages do link to one another


def algorithm_table() -> list[list[str]]:
    """The cells of the README's table mapping Algorithm 1 to the code (data rows only)."""
    text = README.read_text()
    assert MAP_HEADING in text
    section = text.split(MAP_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes of a source file, and its classes' methods as Class.method."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
    return names


def test_every_function_of_the_algorithm_table_exists():
    rows = algorithm_table()
    lines = " ".join(row[0] for row in rows)
    for mark in ("line 2", "line 3", "Eq. 4", "Eq. 5", "Eq. 6", "line 23"):
        assert mark in lines, mark
    named = [name for row in rows for name in re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", row[-1])]
    assert len(named) >= 15
    for name in named:
        module, _, qualified = name.partition(".")
        source = ROOT / f"{module}.py"
        assert source.exists(), f"{name}: no {module}.py"
        assert qualified in defined_names(source), f"{name}: not defined in {module}.py"


def readme_result_rows() -> list[str]:
    """The data rows of the README's two result tables (the default run's and the smollm2 preset's)."""
    lines = README.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line == RESULT_HEADER]
    assert len(starts) == 2
    rows = []
    for start in starts:
        table = []
        for line in lines[start + 2 :]:
            if not line.startswith("|"):
                break
            table.append(line)
        assert len(table) == 3
        rows += table
    return rows


def test_the_readme_result_tables_are_those_of_docs_results():
    results = set((ROOT / "docs" / "results.md").read_text().splitlines())
    for row in readme_result_rows():
        assert re.search(r"\d\.\d{3}", row), row  # a gold mean
        assert row in results, f"not in docs/results.md as written: {row}"


def test_no_page_cites_the_specification():
    for page in pages():
        assert not re.search(r"SPEC\s*(section|§|\d)", page.read_text(), flags=re.I), page.relative_to(ROOT)
