"""Shared test helpers: build configurations around the example, drive ticks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mailflow.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.yaml"
SAMPLE_PLAN = ROOT / "templates" / "workbooks" / "strategic-plan-2017-2022.xlsx"


def example_data() -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    data["campaigns"][0]["workbook"] = str(SAMPLE_PLAN)
    return data


def write_config(tmp_path: Path, data: dict[str, Any], name: str = "mailflow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def smtp_config(tmp_path: Path, host: str, port: int, **mail: Any) -> Config:
    """The example configuration, sending through a test SMTP server, with its store in tmp_path."""
    data = example_data()
    data["mail"] = {
        "transport": "smtp",
        "smtp": {"host": host, "port": port, "security": "none", "timeout": 5},
        **mail,
    }
    data["store"] = str(tmp_path / "mailflow.db")
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(tmp_path, data))
