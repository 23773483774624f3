"""Ingest's source checksums: every file of the catalog hashed (in parallel threads, once all
files are valid), each equal to what coreutils' `sha256sum` computes for it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from sarflow.data.catalog import load_catalog
from sarflow.data.ingest import checksum_files, ingest


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils' sha256sum not installed")
def test_every_source_file_has_the_sha256_that_sha256sum_computes(tiny_scene):
    ing = ingest(load_catalog(tiny_scene))
    files = {uri: f for src in ing.sources for uri, f in src.files.items()}
    assert len(files) >= 4  # the demo scene's sources, S2 split over several files
    out = subprocess.run(["sha256sum", *(f.path for f in files.values())], capture_output=True, text=True, check=True)
    expected = dict(line.split(maxsplit=1)[::-1] for line in out.stdout.splitlines())
    assert {f.path: f.sha256 for f in files.values()} == expected
    # one worker or many: the same digests
    for src in ing.sources:
        for f in src.files.values():
            f.sha256 = ""
    checksum_files(ing.sources, workers=1)
    assert {f.path: f.sha256 for f in files.values()} == expected


def test_without_checksums_nothing_is_hashed(tiny_scene):
    ing = ingest(load_catalog(tiny_scene), checksum=False)
    assert all(f.sha256 == "" for src in ing.sources for f in src.files.values())


def test_ingest_writes_its_manifest_into_a_folder_it_makes(tiny_scene, tmp_path):
    """`sarflow ingest --out` into a folder that does not exist yet: made, the manifest written
    whole (no temporary file left), the same JSON the command prints without --out."""
    import json

    from typer.testing import CliRunner

    from sarflow.cli.main import app

    out = tmp_path / "new" / "deeper" / "manifest.json"
    res = CliRunner().invoke(app, ["ingest", str(tiny_scene), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"manifest written: {out}"
    printed = CliRunner().invoke(app, ["ingest", str(tiny_scene)])
    assert json.loads(out.read_text()) == json.loads(printed.stdout)
    assert sorted(p.name for p in out.parent.iterdir()) == ["manifest.json"]
