"""Feast definitions for `feast apply` run in this folder: everything comes from
sarflow.features.definitions over the features root (SARFLOW_FEATURES_ROOT, default
../data/features), so the CLI and `feast apply` register the same objects."""

import os
from pathlib import Path

from sarflow.features.definitions import build

_root = Path(os.environ.get("SARFLOW_FEATURES_ROOT", Path(__file__).resolve().parent.parent / "data" / "features"))
for _obj in build(_root):
    globals()[_obj.name] = _obj
