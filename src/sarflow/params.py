"""`params.yaml`, the one source of configuration: CLI flags override it, defaults fill gaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sarflow.errors import InputError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """The parsed params file; an absent default file means no overrides."""
    p = Path(path) if path else DEFAULT_PARAMS
    if not p.is_file():
        if path:
            raise InputError(str(p), "params file does not exist")
        return {}
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(str(p), f"not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(str(p), "params must be a mapping of sections")
    return data


def section(params: dict, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A params section with CLI overrides (None means 'not given') applied on top."""
    merged = dict(params.get(name) or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return merged
