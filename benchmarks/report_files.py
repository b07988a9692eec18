"""Where benchmark scripts put their figures: NAME.json (data) and NAME.md (the table), then print it."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_report(out: Path, name: str, report: dict, render: Callable[[dict], str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(render(report))
    print(render(report))
