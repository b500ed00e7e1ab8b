"""The README's tables say what the code does: every setting with its default, every metric.

Operators read the README first; a setting or a metric added without its row would be
found only in the code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import pytest

from warmer.config import SETTINGS, Setting
from warmer.observe.metrics import NAMES

README: Final = Path(__file__).resolve().parents[2] / "README.md"


def _rows(heading: str) -> dict[str, str]:
    """First cell -> second cell of every table row in the section under ``heading``."""
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 2:
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = cells[1]
    return rows


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: setting.name)
def test_every_setting_has_its_row_with_its_default(setting: Setting) -> None:
    rows = _rows("Configuration")
    assert setting.name in rows, f"README's Configuration table has no row for {setting.name}"
    if setting.shown is None:
        assert rows[setting.name] == f"`{setting.default}`"


def test_the_configuration_table_has_no_setting_the_code_lacks() -> None:
    assert set(_rows("Configuration")) <= {setting.name for setting in SETTINGS}


@pytest.mark.parametrize("name", NAMES)
def test_every_metric_has_its_row(name: str) -> None:
    assert name in _rows("Health and metrics"), f"README's metrics table has no row for {name}"


def test_the_metrics_table_has_no_metric_the_code_lacks() -> None:
    assert set(_rows("Health and metrics")) <= set(NAMES)
