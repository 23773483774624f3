"""Component `ingest-scene`: validate every source of a scene's catalog and record provenance.

Thin wrapper over :func:`sarflow.data.ingest.ingest`; it fails the run on bad input (the library's
error names the file and the cause) before any tiling starts, and writes the provenance
manifest as a JSON ``dsl.Artifact``.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output


@dsl.component(base_image="ghcr.io/sarflow/sarflow:0.1.0", install_kfp_package=False)
def ingest_scene(
    scene: Input[Dataset],
    manifest: Output[Artifact],
    metrics: Output[Metrics],
    checksum: bool = True,
    s3_endpoint: str = "",
):
    """Validates the scene's catalog (a folder holding catalog.yaml, or the catalog file itself)."""
    import json
    import os
    from pathlib import Path

    if s3_endpoint:  # credentials come from the environment (the sarflow-minio secret)
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    from sarflow.data.catalog import catalog_path, load_catalog
    from sarflow.data.ingest import ingest

    catalog = catalog_path(scene.path, scene.metadata.get("catalog", "catalog.yaml"))
    ingested = ingest(load_catalog(catalog), checksum=checksum)
    doc = ingested.manifest()
    Path(manifest.path).parent.mkdir(parents=True, exist_ok=True)
    Path(manifest.path).write_text(json.dumps(doc, indent=1, sort_keys=True))
    manifest.metadata.update({"catalog_hash": doc["catalog_hash"], "crs": doc["grid"]["crs"]})
    metrics.log_metric("sources", len(doc["sources"]))
    metrics.log_metric("files", sum(len(s["files"]) for s in doc["sources"]))
    metrics.log_metric("candidate_chips", len(ingested.grid.candidates))
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))  # a real file: see components/__init__
