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


def integral_floats_to_int(value: Any) -> Any:
    """JSON numbers as Python would have written them: KFP passes dict and list parameters as
    protobuf Structs, where every number is a double (32 arrives as 32.0). Integral floats
    become ints, recursively (an int is accepted wherever a float is)."""
    if isinstance(value, dict):
        return {k: integral_floats_to_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral_floats_to_int(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_kwargs(options: dict) -> dict:
    """Keyword arguments for a typed config from a KFP dict parameter: numbers as written
    (integral_floats_to_int) and lists as the config's tuples."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in integral_floats_to_int(dict(options)).items()}
