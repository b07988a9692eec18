"""The README and the pages under docs/: every relative link and image resolves to a file of the
project, every ``#anchor`` to a heading of its page (GitHub's slugs), and the README stays a front
door (at most 300 lines)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links and headings inside them are not links)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")  # kept as a blank line, so line numbers stay those of the file
            continue
        lines.append("" if fenced else line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link and image outside code."""
    found = []
    for number, line in enumerate(prose_lines(page.read_text(encoding="utf-8")), start=1):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken_links(files: list[Path], root: Path = ROOT) -> list[str]:
    """One line per link that does not resolve: a missing file, a path outside ``root``, an unknown anchor."""
    problems = []
    for page in files:
        for number, target in links(page):
            if target.startswith(EXTERNAL):
                continue
            where = f"{page.relative_to(root)}:{number}: {target}"
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.is_relative_to(root.resolve()):
                problems.append(f"{where}: outside the project")
            elif not resolved.exists():
                problems.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


def test_every_link_and_image_in_the_readme_and_docs_resolves():
    files = pages()
    assert len(files) > 5, files  # README and the docs pages
    assert sum(len(links(page)) for page in files) > 30
    assert broken_links(files) == []


def test_the_link_check_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Resume and extend (CPU, `train`)\n\ntext\n")
    (tmp_path / "README.md").write_text(
        "# Title\n\n"
        "[fine](docs/page.md#resume-and-extend-cpu-train) [self](#title) ![img](docs/page.md)\n"
        "[missing file](docs/nope.md)\n"
        "[missing anchor](docs/page.md#resume)\n"
        "![missing image](docs/picture.png)\n"
        "```\n[in a fence](docs/nope.md)\n```\n"
        "`[in code](docs/nope.md)` [web](https://example.com/x) [after a fence](docs/missing.md)\n")
    problems = broken_links([tmp_path / "README.md", tmp_path / "docs" / "page.md"], root=tmp_path)
    assert len(problems) == 4, problems
    assert "README.md:4: docs/nope.md: no such file" in problems
    assert "README.md:5: docs/page.md#resume: no heading with anchor #resume" in problems
    assert "README.md:6: docs/picture.png: no such file" in problems
    assert "README.md:10: docs/missing.md: no such file" in problems  # line numbers count fenced lines too


def test_headings_get_githubs_anchors():
    assert slug("Sparse training (GPU: NVIDIA H200)") == "sparse-training-gpu-nvidia-h200"
    assert slug("Benchmark the method: `onion bench train`") == "benchmark-the-method-onion-bench-train"
    assert slug("Your own images: the rules as they stand") == "your-own-images-the-rules-as-they-stand"
    assert slug("The reader: `ShardDataset`") == "the-reader-sharddataset"


def test_the_readme_is_a_front_door_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_the_docs_name_no_internal_design_notes():
    for page in pages():
        assert "shared/DESIGN.md" not in page.read_text(encoding="utf-8"), page
