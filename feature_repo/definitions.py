"""Feast definitions for `feast apply` run in this folder: everything comes from
sarflow.features.definitions over the features root (SARFLOW_FEATURES_ROOT: a local folder or an
s3:// prefix, default ../data/features), so the CLI and `feast apply` register the same objects.
For an s3:// root the sources get `s3_endpoint_override` from AWS_ENDPOINT_URL at apply time."""

import os
from pathlib import Path

from sarflow.features.definitions import build

_root = os.environ.get("SARFLOW_FEATURES_ROOT") or str(Path(__file__).resolve().parent.parent / "data" / "features")
for _obj in build(_root):
    globals()[_obj.name] = _obj
