"""The README stays a user's page and no link in the docs points nowhere."""

from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 300
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
RESULT_PATH = re.compile(r"benchmarks/results/[A-Za-z0-9_./\-]+\.(?:jsonl|json|png)\b")
RESULTS = ROOT / "benchmarks" / "results"


def doc_files() -> list[Path]:
    """README.md, docs/*.md and docs/experiments/*.md: the pages a reader follows links through."""
    docs = ROOT / "docs"
    return [ROOT / "README.md", *sorted(docs.glob("*.md")), *sorted((docs / "experiments").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = CODE.sub(lambda m: m.group(0)[1:-1], heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every anchor the headings of a page define (outside code fences)."""
    text = FENCE.sub("", markdown)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def links(markdown: str) -> list[str]:
    """Relative link targets of a page, code fences and code spans left out."""
    text = CODE.sub("", FENCE.sub("", markdown))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def broken_links(page: Path) -> list[str]:
    """The links of one page whose file or heading does not exist."""
    bad = []
    for target in links(page.read_text()):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            bad.append(f"{target} (no such heading)")
    return bad


def test_readme_is_short_and_opens_with_what_it_is_and_a_screenshot():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES}"
    opening = "\n".join(lines[:15])
    assert lines[0].startswith("# kto-loop")
    assert "chat app" in opening.lower() and "KTO" in opening
    shot = re.search(r"!\[[^\]]*\]\((docs/screenshots/[^)]+\.png)\)", opening)
    assert shot and (ROOT / shot.group(1)).exists()


def test_architecture_package_map_names_files_that_exist():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## Package map", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    assert rows, "docs/ARCHITECTURE.md has no package map"
    missing = []
    for row in rows:
        where, job = row.split(" | ", 1)
        dirs = [d for d in re.findall(r"`([^`]+)`", where) if d.endswith("/")] or [""]
        for name in re.findall(r"`([\w/]+(?:\.py|\.jsonl|/))`", where + job):
            if not any((ROOT / d / name).exists() for d in ["", *dirs]):
                missing.append(name)
    assert missing == []


def test_readme_cli_table_lists_every_subcommand():
    from app.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    table = re.findall(r"^\| `kto-loop (\w+)", (ROOT / "README.md").read_text(), re.M)
    assert sorted(set(table)) == sorted(sub.choices)


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_result_file_exists(page: Path):
    missing = sorted({p for p in RESULT_PATH.findall(page.read_text()) if not (ROOT / p).exists()})
    assert missing == []


def uncited_results(results: Path, pages: list[Path]) -> list[str]:
    """Result files under `results` that no page names by path: a number nobody reports cannot be checked."""
    cited = {c for page in pages for c in RESULT_PATH.findall(page.read_text())}
    base = results.parents[1]
    return sorted(str(f.relative_to(base)) for f in results.rglob("*")
                  if f.is_file() and str(f.relative_to(base)) not in cited)


def test_every_result_file_is_cited():
    pages = [*doc_files(), ROOT / "benchmarks" / "README.md"]
    assert uncited_results(RESULTS, pages) == []


def test_the_result_check_catches_an_uncited_file(tmp_path: Path):
    results = tmp_path / "benchmarks" / "results" / "x_bench"
    results.mkdir(parents=True)
    (results / "2026-01-01_cpu.json").write_text("{}")
    (results / "2026-01-02_cpu.json").write_text("{}")
    page = tmp_path / "page.md"
    page.write_text("[json](benchmarks/results/x_bench/2026-01-01_cpu.json)\n")
    assert uncited_results(tmp_path / "benchmarks" / "results", [page]) == [
        "benchmarks/results/x_bench/2026-01-02_cpu.json"]


PRODUCT_PACKAGES = ("app", "aligner", "serving", "feedback_store")
# a results path, or a file name that starts with a benchmark's name (or any *_bench / *_ab) and ends in .json
BENCH_NAMES = "|".join(sorted(d.name for d in RESULTS.iterdir() if d.is_dir()))
RESULT_NAME = re.compile(rf"benchmarks/results/|\b(?:\w+_bench|\w+_ab|{BENCH_NAMES})[\w/.-]*\.json\b")


def result_mentions(files: list[Path]) -> list[str]:
    """Lines of product code that name a benchmark result file: they cite the docs page instead, which outlives a
    rename of the file and says what the number means."""
    return [f"{f.name}:{n}: {line.strip()}" for f in files
            for n, line in enumerate(f.read_text().splitlines(), 1) if RESULT_NAME.search(line)]


def test_product_code_cites_docs_pages_not_result_files():
    files = sorted(f for pkg in PRODUCT_PACKAGES for f in (ROOT / pkg).rglob("*.py"))
    assert files and result_mentions(files) == []


def test_the_code_check_catches_a_result_file(tmp_path: Path):
    code = tmp_path / "m.py"
    code.write_text("# 1.2x (benchmarks/results/x_bench/2026-01-01_cpu.json)\n# 1.3x (lora_kernel_bench_avx2.json)\n"
                    "# 1.4x (aligner_bench/2026-11-23_epyc.json)\n# 1.5x (probe_repeat.json)\n"
                    "# 1.6x (docs/experiments/2026-01-01-x.md)\nSTATE = 'schedule_state.json'\n")
    assert [m.split(":")[1] for m in result_mentions([code])] == ["1", "2", "3", "4"]


def test_experiments_index_lists_every_page():
    folder = ROOT / "docs" / "experiments"
    index = (folder / "README.md").read_text()
    dated = sorted(p.name for p in folder.glob("*.md") if re.match(r"\d{4}-\d{2}-\d{2}-[a-z0-9-]+\.md$", p.name))
    assert dated, "docs/experiments has no dated pages"
    assert [n for n in dated if f"({n})" not in index] == []
    others = sorted(p.name for p in folder.glob("*.md") if p.name not in dated and p.name != "README.md")
    assert others == ["simulator.md"], "experiment pages are named YYYY-MM-DD-topic.md"


def test_the_checker_catches_a_broken_link_and_a_missing_heading(tmp_path: Path):
    (tmp_path / "there.md").write_text("# A heading with `code`\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-heading-with-code) [web](https://example.org/x)\n"
                    "`[not a link](nowhere.md)`\n[gone](nowhere.md) [bad](there.md#no-such)\n")
    assert broken_links(page) == ["nowhere.md (no such file)", "there.md#no-such (no such heading)"]
