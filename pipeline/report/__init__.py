"""``onion report``: a static web page a person browses to see who was kept, who was dropped, why,
and what it cost.

One job per module: :mod:`.gather` reads the dataset, its selections, scores, duplicate groups,
training runs and a bench into plain data; :mod:`.thumbnails` picks a bounded, deterministic sample
of examples and makes their thumbnails from the shards by byte range, in parallel; :mod:`.site`
writes data and assets into a temporary folder next to the output and moves it into place. The page
itself (``assets/``) is plain HTML, CSS and JavaScript that reads the data from ``<script src>``
files, so it opens from ``file://`` with no network at all.
"""
from __future__ import annotations

from pipeline.report.site import ReportOptions, build_report

__all__ = ["ReportOptions", "build_report"]
