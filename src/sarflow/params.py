"""`params.yaml`, the one source of configuration: each stage reads one section into its typed
config, CLI flags override it, the config's defaults fill the gaps.

A stage config is a pydantic dataclass (or model) that forbids extra keys; :func:`stage_config`
builds one from a section plus overrides and turns pydantic's validation errors into an
:class:`~sarflow.errors.InputError` that names the file and the key. This module is the base
room: it imports no stage (the doors map section names to config classes).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict

from sarflow.errors import InputError

DEFAULT_PARAMS = Path("params.yaml")
TRACKING_DEFAULT = "sqlite:///mlflow.db"  # the embedded default: MLflow on SQLite in the working folder
# every stage config: `@pydantic.dataclasses.dataclass(config=STAGE_CONFIG)`, so an unknown key is refused
STAGE_CONFIG = ConfigDict(extra="forbid")


def default_tracking_uri() -> str:
    """The tracking URI a stage uses when none is given: $MLFLOW_TRACKING_URI, else the embedded default."""
    return os.environ.get("MLFLOW_TRACKING_URI") or TRACKING_DEFAULT


class Params(dict):
    """The parsed params file: a mapping of sections that remembers which file it came from."""

    def __init__(self, data: dict | None = None, source: str = "params"):
        super().__init__(data or {})
        self.source = source


def load_params(path: str | Path | None = None) -> Params:
    """The parsed params file; an absent default file means no overrides."""
    p = Path(path) if path else DEFAULT_PARAMS
    if not p.is_file():
        if path:
            raise InputError(str(p), "params file does not exist")
        return Params({}, str(p))
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(str(p), f"not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(str(p), "params must be a mapping of sections")
    for name, value in data.items():
        if value is not None and not isinstance(value, dict):
            raise InputError(str(p), f"{name}: a section must be a mapping of keys, not {type(value).__name__}")
    return Params(data, str(p))


def source_of(params: dict) -> str:
    """The file a params mapping came from (what errors name)."""
    return getattr(params, "source", "params")


def check_sections(params: dict, known) -> None:
    """Refuses a top-level section that no stage reads, naming it and the file."""
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(source_of(params), f"{unknown[0]}: unknown section (known: {', '.join(sorted(known))})")


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` on top, key by key into nested mappings; None means 'not given'."""
    out = dict(base)
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, dict):
            nested = merge(out[k] if isinstance(out.get(k), dict) else {}, v)
            if nested:  # a mapping of nothing but Nones overrides nothing
                out[k] = nested
        else:
            out[k] = v
    return out


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def stage_config(cls, params: dict, name: str, overrides: dict[str, Any] | None = None, **given):
    """The stage config `cls` from section `name` of `params`, `overrides` on top (None: not
    given; nested mappings merge key by key), and `given` (values the stage supplies itself,
    such as the store path). A null in the file means 'the default'. Unknown keys and bad
    values are an InputError naming the file and `<section>.<key>`."""
    from pydantic import ValidationError

    section = params.get(name) or {}
    values = merge(_drop_none(integral_floats_to_int(dict(section))), overrides or {})
    values.update(given)
    try:
        return cls(**values)
    except ValidationError as e:
        raise InputError(source_of(params), _describe(e, name, cls)) from None
    except (TypeError, ValueError) as e:  # a check of the config itself (__post_init__)
        raise InputError(source_of(params), f"{name}: {e}") from None


def _describe(error, name: str, cls) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if not (isinstance(p, str) and p.startswith("function-"))]
    key = ".".join([name, *loc])
    if first.get("type") == "unexpected_keyword_argument" or first.get("type") == "extra_forbidden":
        return f"{key}: unknown key (known: {', '.join(known_keys(cls, loc[:-1]))})"
    if first.get("type") in ("missing", "missing_argument"):
        return f"{key}: required"
    return f"{key}: {first.get('msg')} (got {first.get('input')!r})"


def known_keys(cls, path: list[str]) -> list[str]:
    """The field names of `cls`, or of the nested config at `path` (list of field names)."""
    import dataclasses

    for part in path:
        hint = _field_types(cls).get(part)
        if hint is None:
            return []
        cls = hint
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return list(getattr(cls, "model_fields", {}))


def _field_types(cls) -> dict:
    import typing

    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # a forward reference the module cannot resolve
        return {}


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


@contextmanager
def environ(env: dict[str, str]):
    """`env` set in os.environ for the duration of the block, then restored."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
