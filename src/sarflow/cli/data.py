"""`sarflow synth | ingest | tile | tile-checksum | tile-plan | tile-screen | tile-unit | tile-finalize | info | version | export`: the data plane, catalog to versioned chip store."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from sarflow.cli.common import ParamsOpt, absolute_path, fail, stage_config
from sarflow.errors import SarflowError


def synth(
    out_dir: Path = typer.Argument(..., callback=absolute_path, help="folder to write the scene into"),
    size: Optional[int] = typer.Option(None, help="scene side in 10 m pixels (up to 10980, a Sentinel-2 tile)"),
    seed: Optional[int] = typer.Option(None, help="random seed; the same seed gives the same bytes"),
    chip_size: Optional[int] = typer.Option(None, help="chip size written into catalog.yaml"),
    cloud_fraction: Optional[float] = typer.Option(None, help="fraction of the S2 scene under cloud"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Generate a synthetic AOI: S1 GRD/coherence/phase, S2 with clouds, labels, municipalities, catalog."""
    from sarflow.data.synth import synthesize

    try:
        cfg = stage_config("synth", params,
                           {"size_px": size, "seed": seed, "chip_size": chip_size, "cloud_fraction": cloud_fraction})
        catalog = synthesize(out_dir, cfg)
    except (SarflowError, ValueError, TypeError) as e:
        fail(e if isinstance(e, SarflowError) else SarflowError(str(e)))
    typer.echo(f"scene written: {catalog}")


def ingest(
    catalog: Path = typer.Argument(..., callback=absolute_path, help="catalog.yaml"),
    out: Optional[Path] = typer.Option(None, callback=absolute_path, help="write the provenance manifest (JSON) here"),
) -> None:
    """Validate every source of a catalog and print (or write) the provenance manifest."""
    from sarflow.data.catalog import load_catalog
    from sarflow.data.ingest import ingest as run_ingest

    try:
        if out:
            from sarflow.data.paths import check_output_folder

            check_output_folder(out.parent, str(out), "choose another --out or make that folder writable, then rerun")
        manifest = run_ingest(load_catalog(catalog)).manifest()
        text = json.dumps(manifest, indent=1, sort_keys=True)
        if out:
            from sarflow.data.paths import write_atomic

            write_atomic(out, lambda tmp: Path(tmp).write_text(text))
    except SarflowError as e:
        fail(e)
    typer.echo(f"manifest written: {out}" if out else text)


def _tile_options(params, **flags):
    return stage_config("tile", params, flags)


def tile(
    catalog: Path = typer.Argument(..., callback=absolute_path, help="catalog.yaml"),
    out: str = typer.Option(..., "--out", callback=absolute_path,
                            help="chip store to write: a .zarr folder or s3://bucket/prefix (endpoint and keys from AWS_*)"),
    workers: Optional[int] = typer.Option(None, help="warping threads per process"),
    processes: int = typer.Option(1, help="unit runners in separate processes (each writes its own shards)"),
    shard_chips: Optional[int] = typer.Option(None, help="chips per shard file"),
    block_chips: Optional[int] = typer.Option(None, help="chips per side of a block of the store order"),
    window_px: Optional[int] = typer.Option(None, help="side of a warp window in pixels (rounded to whole chips)"),
    unit_shards: Optional[int] = typer.Option(None, help="shards per work unit (0: as many as fit 256 MB)"),
    split_block: Optional[int] = typer.Option(None, help="chips per side of a block that goes whole to one split (0 = auto, sized from the AOI)"),
    overwrite: bool = typer.Option(False, help="replace an existing store"),
    no_checksum: bool = typer.Option(False, "--no-checksum", help="skip sha256 of the inputs (faster, less provenance)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Align every source onto the grid and write the sharded Zarr v3 chip store (resumes a killed run).
    Runs plan -> units -> finalize in this process, or the units in `--processes` processes."""
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import tile as run_tile
    from sarflow.data.tile_units import build_lock, finalize, plan, run_units

    try:
        options = _tile_options(params, workers=workers, shard_chips=shard_chips, block_chips=block_chips,
                                window_px=window_px, unit_shards=unit_shards, split_block=split_block,
                                overwrite=overwrite or None, checksum=False if no_checksum else None)
        if processes > 1:
            with build_lock(out):  # one build of this output at a time (the units' processes share it)
                plan(load_catalog(catalog), out, options)
                run_units(out, processes=processes, workers=options.workers)
                store = finalize(out)
        else:
            store = run_tile(load_catalog(catalog), out, options, show_progress=not quiet and sys.stderr.isatty())
    except SarflowError as e:
        fail(e)
    from sarflow.data.chipstore import open_chip_group

    typer.echo(f"chip store written: {store} ({open_chip_group(str(store)).attrs['chips']} chips)")


def tile_plan(
    catalog: Optional[Path] = typer.Argument(None, callback=absolute_path,
                                             help="catalog.yaml (omit it to finish the plan of a store surveyed with "
                                                  "`tile-plan CATALOG --survey N` and screened with `tile-screen`)"),
    out: str = typer.Option(..., "--out", callback=absolute_path, help="chip store: a .zarr folder or s3://bucket/prefix"),
    shard_chips: Optional[int] = typer.Option(None, help="chips per shard file"),
    block_chips: Optional[int] = typer.Option(None, help="chips per side of a block of the store order"),
    window_px: Optional[int] = typer.Option(None, help="side of a warp window in pixels"),
    unit_shards: Optional[int] = typer.Option(None, help="shards per work unit (0: as many as fit 256 MB)"),
    workers: Optional[int] = typer.Option(None, help="warping threads (here and, by default, in each unit)"),
    split_block: Optional[int] = typer.Option(None, help="chips per side of a split block (0 = auto)"),
    overwrite: bool = typer.Option(False, help="replace an existing store"),
    no_checksum: bool = typer.Option(False, "--no-checksum", help="skip sha256 of the inputs"),
    survey_parts: Optional[int] = typer.Option(None, "--survey", min=1,
                                               help="survey only: cut the plan's screening into this many parts, "
                                                    "each for `tile-screen STORE --part I` (any machine), then "
                                                    "`tile-plan --out STORE` finishes the plan"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Distributed tiling, step 1: fix every chip's index, create the arrays, cut the work units; prints
    {"uri", "units", "chips"} (JSON). Then `tile-unit` for every unit (any order, any machine), then `tile-finalize`.
    The plan reads every required source once; at scale that reading fans out too: `--survey N` (prints
    {"uri", "parts"}), `tile-screen` for each part, then `tile-plan --out STORE` without the catalog."""
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile_units import commit_plan, plan, survey

    try:
        if catalog is None:
            given = [k for k, v in dict(shard_chips=shard_chips, block_chips=block_chips, window_px=window_px,
                                        unit_shards=unit_shards, workers=workers, split_block=split_block,
                                        survey=survey_parts, params=params, overwrite=overwrite or None,
                                        no_checksum=no_checksum or None).items() if v is not None]
            if given:
                raise SarflowError("without a catalog, tile-plan finishes a surveyed store's plan with the survey's "
                                   f"options; drop {', '.join('--' + k.replace('_', '-') for k in given)}")
            p = commit_plan(out)
        else:
            options = _tile_options(params, workers=workers, shard_chips=shard_chips, block_chips=block_chips,
                                    window_px=window_px, unit_shards=unit_shards, split_block=split_block,
                                    overwrite=overwrite or None, checksum=False if no_checksum else None)
            if survey_parts:
                s = survey(load_catalog(catalog), out, options, survey_parts)
                typer.echo(json.dumps({"uri": out, "parts": len(s.parts)}))
                return
            p = plan(load_catalog(catalog), out, options)
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps({"uri": p.uri, "units": len(p.units), "chips": p.total}))


def tile_checksum(
    catalog: Path = typer.Argument(..., callback=absolute_path, help="catalog.yaml"),
    out: str = typer.Option(..., "--out", callback=absolute_path, help="chip store: a .zarr folder or s3://bucket/prefix"),
    parts: int = typer.Option(..., min=1, help="the input files are cut into this many parts"),
    part: Optional[int] = typer.Option(None, help="the part to hash (from 0); default: $JOB_COMPLETION_INDEX"),
    overwrite: bool = typer.Option(False, help="the store will be replaced (`tile-plan --overwrite`)"),
    workers: Optional[int] = typer.Option(None, min=1, help="hashing threads (default: up to 8)"),
) -> None:
    """Distributed tiling, step 0 (before `tile-plan CATALOG --out STORE --survey N`): hash one part of the
    input files (about 1/PARTS of their bytes) and record the checksums in the store's build, where the survey
    takes them instead of reading every input in one process. A part past the files does nothing."""
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile_units import checksum_part

    try:
        index = part if part is not None else _job_index()
        if index is None:
            raise SarflowError(f"--parts {parts}: give the part with --part or $JOB_COMPLETION_INDEX")
        hashed = checksum_part(load_catalog(catalog), out, index, parts, overwrite=overwrite, workers=workers)
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps({"uri": out, "part": index, "hashed": hashed}))


def tile_screen(
    store: str = typer.Argument(..., callback=absolute_path, help="the surveyed store (folder or s3://)"),
    part: Optional[list[int]] = typer.Option(None, "--part", help="part(s) to screen (repeatable); default: "
                                             "$JOB_COMPLETION_INDEX (a Kubernetes Indexed Job), else every part not done"),
    workers: Optional[int] = typer.Option(None, help="reading threads (default: the survey's)"),
) -> None:
    """Distributed tiling, step 1b (after `tile-plan CATALOG --out STORE --survey N`): screen parts of the
    grid (which candidate chips hold a valid pixel of every required source). A part done already, or past
    the parts, is left as it is."""
    from sarflow.data.tile_units import Location, Survey, screen_part

    try:
        index = None if part else _job_index()  # a part named on the command line wins over the Job's index
        parts = list(part or ([index] if index is not None else range(len(Survey.load(Location(store)).parts))))
        kept = {i: screen_part(store, i, workers=workers) for i in parts}
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps({"uri": store, "screened": {str(i): k for i, k in kept.items() if k is not None}}))


def _job_index() -> int | None:
    """$JOB_COMPLETION_INDEX (a Kubernetes Indexed Job's pod), or None when it is not set."""
    import os

    index = os.environ.get("JOB_COMPLETION_INDEX")
    if not index:
        return None
    try:
        return int(index)
    except ValueError:
        raise SarflowError(f"$JOB_COMPLETION_INDEX is {index!r}, not a completion index (0, 1, ...)") from None


def tile_unit(
    store: str = typer.Argument(..., callback=absolute_path, help="the planned store (folder or s3://)"),
    unit: Optional[list[int]] = typer.Option(None, "--unit", help="unit(s) to write (repeatable); default: "
                                             "$JOB_COMPLETION_INDEX (a Kubernetes Indexed Job), else every unit not done"),
    runs: Optional[int] = typer.Option(None, min=1, help="cut the units into this many runs of consecutive units "
                                       "and write one of them (--run, else $JOB_COMPLETION_INDEX)"),
    run: Optional[int] = typer.Option(None, min=0, help="with --runs: which run (from 0)"),
    workers: Optional[int] = typer.Option(None, help="warping threads (default: the plan's)"),
    force: bool = typer.Option(False, help="rewrite units already written"),
) -> None:
    """Distributed tiling, step 2: warp and write the units' shards straight into the store, then their reports.
    Consecutive units in one call warp a block they share once."""
    from sarflow.data.tile_units import Location, Plan, run_of, run_units

    try:
        units = list(unit or [])
        index = None if units or run is not None else _job_index()  # named units or run win over the Job's index
        if units and (runs or run is not None):
            raise SarflowError("--unit cannot be combined with --runs/--run")
        if not units:
            if runs:
                i = run if run is not None else index
                if i is None:
                    raise SarflowError(f"--runs {runs}: give the run with --run or $JOB_COMPLETION_INDEX")
                units = run_of(store, runs, i)
            elif run is not None:
                raise SarflowError("--run needs --runs")
            elif index is not None:  # an Indexed Job of more completions than units: the extra pods do nothing
                units = [index] if index < len(Plan.load(Location(store)).units) else []
            else:
                units = None  # every unit not done (with --force every unit), from one listing
        written = run_units(store, units, workers=workers, force=force)
    except SarflowError as e:
        fail(e)
    typer.echo(f"units written: {written}")


def tile_finalize(store: str = typer.Argument(..., callback=absolute_path, help="the planned store (folder or s3://)")) -> None:
    """Distributed tiling, step 3 (after every unit): chips.parquet, statistics, attributes, consolidated metadata."""
    from sarflow.data.tile_units import finalize

    try:
        uri = finalize(store)
    except SarflowError as e:
        fail(e)
    typer.echo(f"chip store written: {uri}")


def info(store: Path = typer.Argument(..., callback=absolute_path, help="chip store"),
         as_json: bool = typer.Option(False, "--json", help="the summary as JSON")) -> None:
    """Summarise a chip store: grid, chips per split, integrity, its arrays (a table; --json for machines)."""
    from sarflow.data.chipstore import open_store

    try:
        summary = open_store(store).summary()
    except SarflowError as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    typer.echo(f"{summary['path']}\n  grid: {summary['crs']}, {summary['resolution']} m, chips of {summary['chip_size']} px"
               f"\n  chips: {summary['chips']} ({', '.join(f'{k} {v}' for k, v in summary['splits'].items())})"
               f"\n  integrity: {summary['integrity']}\n  catalog hash: {summary['catalog_hash']}")
    width = max(len(m) for m in summary["modalities"])
    typer.echo(f"  {'array'.ljust(width)}  kind         units            bands")
    for name, m in summary["modalities"].items():
        typer.echo(f"  {name.ljust(width)}  {str(m['kind']).ljust(11)}  {str(m['units']).ljust(15)}  {', '.join(map(str, m['bands']))}")


def version(
    store: str = typer.Argument(..., callback=absolute_path, help="chip store to version (a folder: DVC; s3://: an object manifest beside it)"),
    remote: Optional[str] = typer.Option(None, callback=absolute_path,
                                         help="DVC remote URL (s3://bucket/prefix or a folder) to push to"),
    repo: Optional[Path] = typer.Option(None, callback=absolute_path,
                                        help="DVC repository root (default: the enclosing one, else the store's folder)"),
) -> None:
    """Version the store with DVC (dvc add + push); prints the dataset version."""
    from sarflow.data.versioning import version_store

    try:
        v = version_store(store, remote=remote, repo=repo)
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps(v, indent=1))


def export(
    store: Path = typer.Argument(..., callback=absolute_path, help="chip store"),
    modality: str = typer.Option(..., "--modality", help="the store's array to export (an input or a label)"),
    out: Path = typer.Option(..., "--out", callback=absolute_path, help="folder to write the GeoTIFFs into"),
    chips: Optional[str] = typer.Option(None, "--chips", help="comma-separated chip ids to export"),
    split: Optional[str] = typer.Option(None, "--split", help="export every chip of this split (train, val, test)"),
    all_chips: bool = typer.Option(False, "--all", help="export every chip of the store"),
    mosaic: bool = typer.Option(False, "--mosaic", help="one mosaic of the chosen chips on the store's grid "
                                                        "instead of one file per chip"),
) -> None:
    """Write chips as Cloud-Optimized GeoTIFFs (one <modality>_<chip_id>.tif each, or one <modality>_mosaic.tif)
    that GDAL, QGIS and rasterio open in place; nodata kept (NaN for floats, the declared value for integers)."""
    from sarflow.data.export import export_chips

    ids = [c.strip() for c in chips.split(",") if c.strip()] if chips else None
    try:
        from sarflow.data.paths import check_output_folder

        check_output_folder(out, str(out), "choose another --out or make that folder writable, then rerun")
        written = export_chips(store, modality, out, chips=ids, split=split, all_chips=all_chips, mosaic=mosaic)
    except SarflowError as e:
        fail(e)
    typer.echo(f"{len(written)} GeoTIFF(s) written to {out}" + (f": {written[0].name}" if len(written) == 1 else ""))


COMMANDS = [synth, ingest, tile, tile_checksum, tile_plan, tile_screen, tile_unit, tile_finalize, info, version, export]
