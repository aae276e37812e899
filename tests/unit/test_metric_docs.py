"""The README's metrics table is the catalog: every exported family is documented, nothing more."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.metric_catalog import CATALOG

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_metrics_table_matches_the_catalog():
    section = README.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(ray_moe_serve_\w+)` \|", section, re.M))
    assert documented == {spec.exported_name for spec in CATALOG}
