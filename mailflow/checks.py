"""Checks of everything the configuration points to: workbooks, templates, the store's folder.

Structural validation lives in :mod:`mailflow.config`; this module adds what
needs the workbook reader and the template renderer, and is what
``check-config``, ``tick`` and ``run`` call before doing anything."""

from __future__ import annotations

import os
from pathlib import Path

from mailflow.config import Config, load_config
from mailflow.errors import ConfigError
from mailflow.render import Renderer
from mailflow.workbook import check_columns


def check_resources(config: Config, *, templates: bool = True) -> list[str]:
    """Every problem with the files and folders the configuration names, one line each.

    ``templates=False`` skips rendering every template, for commands that send nothing."""
    source = config.path.name
    problems: list[str] = []

    def add(key: str, message: str) -> None:
        line = config.lines.get(key)
        where = f"{source}:{line}" if line else source
        problems.append(f"{where}: {key}: {message}")

    for index, campaign in enumerate(config.campaigns):
        for message in check_columns(campaign.workbook, campaign.key_column, campaign.fill_column, campaign.sheet):
            add(f"campaigns[{index}].workbook", message)
    if templates:
        for message in Renderer(config.templates).check():
            add("templates", message)
    folder = _existing_parent(config.store)
    if not os.access(folder, os.W_OK):
        add("store", f"cannot create or write {config.store}: folder {folder} is not writable")
    return problems


def _existing_parent(path: Path) -> Path:
    for candidate in (path.parent, *path.parent.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def load_checked_config(path: str | Path, *, templates: bool = True) -> Config:
    """Load and validate the configuration and its resources; raise ConfigError listing every problem."""
    config = load_config(path)
    problems = check_resources(config, templates=templates)
    if problems:
        raise ConfigError(problems)
    return config
