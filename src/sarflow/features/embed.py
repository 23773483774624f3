"""`sarflow embed`: run a registered encoder over every chip of the store and write the
embeddings as a Parquet offline source, one partition per model version so versions never mix:

    <root>/embeddings/model=<name>/version=<version>/part-00000.parquet

Columns: chip_id, embedding (fixed-size list of float32), model_name, model_version,
dataset_version (the store's DVC hash), event_timestamp, lon, lat (chip centroid), split, and
geometry: the chip's footprint polygon in EPSG:4326 (from the store's chips.parquet) as WKB. The
file is GeoParquet 1.1 (the `geo` file metadata names `geometry` as its primary column, with its
encoding, types, CRS as PROJJSON and bbox), so geopandas.read_parquet gives a GeoDataFrame and
DuckDB, GDAL/QGIS and other GeoParquet readers find the geometry as they are.

The root is a local folder or an s3:// prefix (on the endpoint and keys of `sarflow.data.storage`,
i.e. AWS_ENDPOINT_URL and the AWS key variables). A partition only appears once complete: locally
it is written to a `.partial-*` folder renamed into place; on S3 the file is uploaded to a
`.partial-*` key outside every source folder and copied to its final key (one S3 copy is atomic:
the final object exists whole or not at all), then the temporary key is removed.

Fan-out over shard ranges (one task per range, e.g. one GPU each): `embed_store(..., shards=(a, b))`
(`sarflow embed --shards a:b`) embeds the chips of store shards [a, b) (the chip axis's zarr
shards) into its own part, staged outside every source folder:

    <root>/embeddings/.staging/model=<name>/version=<version>/part-<a>-<b>.parquet

(written atomically, its range, model, version, dataset version and totals in the file's
`sarflow.part` metadata, so a part present is a part complete; a rerun of a range replaces it).
`finalize_embeddings` (`sarflow embed --finalize`) checks that the parts cover every shard once
(no gap, no overlap) with one model, version, dataset version and dimension, then publishes
them as the partition's `part-NNNNN.parquet` files in shard order: locally a `.partial-*` folder
renamed into place; on S3 the parts are copied under a `_publishing` marker that sarflow's
readers honour (`embedding_partitions` skips the partition until the marker is removed, last).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pydantic import Field
from pydantic.dataclasses import dataclass as config_dataclass

from sarflow.data.paths import check_root, exists, filesystem, fs_path, is_remote, join, parquet_files, write_table_atomic
from sarflow.errors import InputError, SarflowError, StorageError
from sarflow.params import STAGE_CONFIG, default_tracking_uri
from sarflow.processes import alive

log = logging.getLogger(__name__)
EMBEDDINGS = "embeddings"


@config_dataclass(config=STAGE_CONFIG)
class EmbedConfig:
    """params.yaml's `embed:` section (the features root is `features.root`): chips per forward
    pass, the device (None: CUDA when present), the chip readers (`readers` processes; 0: in
    this process, with `workers` threads), the MLflow server holding the encoder, and `parts`:
    how many shard ranges the pipelines' embedding fans out over (one GPU task each, then one
    publish; 1: a single task; `sarflow embed` ignores it)."""

    batch_size: int = 256
    device: str | None = None
    workers: int = Field(default=2, ge=1)
    readers: int = Field(default=0, ge=0)
    tracking_uri: str = field(default_factory=default_tracking_uri)
    parts: int = 1


@dataclass(frozen=True)
class ModelRef:
    uri: str
    name: str
    version: str


def resolve_model(uri: str) -> ModelRef:
    """A model reference (the rule of every --model: models:/NAME/VERSION, models:/NAME@ALIAS or a
    bare registered NAME, its newest version; see sarflow.mlops.registry.MODEL_RULE) or
    runs:/ID/PATH -> name and version; a clear error if the registry lacks it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from sarflow.mlops.registry import MODEL_RULE, resolve_model_ref

    client = mlflow.MlflowClient()
    try:
        if uri.startswith("runs:/"):
            run_id = uri[len("runs:/"):].split("/", 1)[0]
            client.get_run(run_id)
            return ModelRef(uri=uri, name=f"run-{run_id}", version="0")
        name, version = resolve_model_ref(uri, client=client)
        mv = client.get_model_version(name, version)
        return ModelRef(uri=f"models:/{mv.name}/{mv.version}", name=mv.name, version=str(mv.version))
    except MlflowException as e:
        raise InputError(uri, f"no such model in the MLflow registry at {mlflow.get_tracking_uri()} ({e.error_code})") from None
    except InputError as e:
        if "not a model reference" in str(e):
            raise InputError(uri, f"not a model reference: use {MODEL_RULE}, or runs:/RUN_ID/PATH") from None
        raise


GEOPARQUET_VERSION = "1.1.0"


def geoparquet_metadata(wkb: list[bytes] | np.ndarray, column: str = "geometry") -> dict:
    """The GeoParquet 1.1 `geo` file metadata of one WKB geometry column in EPSG:4326 (lon/lat):
    primary column, encoding, geometry types, CRS as PROJJSON (EPSG:4326, so readers report
    EPSG:4326, not the OGC:CRS84 an omitted crs means) and bbox [xmin, ymin, xmax, ymax]."""
    from pyproj import CRS

    geoms = shapely.from_wkb(np.asarray(wkb, dtype=object))
    types = sorted({shapely.get_type_id(g) for g in geoms if g is not None})
    names = ["Point", "LineString", "LineString", "Polygon", "MultiPoint", "MultiLineString", "MultiPolygon",
             "GeometryCollection"]
    bounds = shapely.total_bounds(geoms) if len(geoms) else np.full(4, np.nan)
    return {
        "version": GEOPARQUET_VERSION,
        "primary_column": column,
        "columns": {column: {
            "encoding": "WKB",
            "geometry_types": [names[t] for t in types],
            "crs": CRS.from_epsg(4326).to_json_dict(),
            **({"bbox": [float(v) for v in bounds]} if np.isfinite(bounds).all() else {}),
        }},
    }


def partition(root: str | Path, model: ModelRef) -> str | Path:
    return join(root, EMBEDDINGS, f"model={model.name}", f"version={model.version}")


def encoder_sources(encoder) -> list[tuple[str, str, list[str]]]:
    """(group, store source, bands) blocks the encoder reads, in its channel order."""
    sources = getattr(encoder, "sources", None)
    if sources is None:  # a ChipEncoder pickled before encoders recorded their sources: one source per group
        sources = [(name, m, list(bands)) for (name, bands), m in zip(encoder.groups, encoder.modalities)]
    return sources


def encoder_arrays(group, encoder, store: str) -> list:
    """(zarr array, band indices) of each of the encoder's input blocks in the chip store's zarr
    `group` (opened from `store`), in the encoder's channel order: the same sources and bands it
    was trained on (recorded by `pretrain`)."""
    arrays = []
    mods = list(group.attrs["modalities"])
    for _, modality, bands in encoder_sources(encoder):
        if modality not in mods:
            raise InputError(store, f"the encoder needs modality {modality!r}, the store has {mods}")
        arr = group[modality]
        have = list(arr.attrs["bands"])
        missing = [b for b in bands if b not in have]
        if missing:
            raise InputError(store, f"the encoder needs band(s) {missing} of {modality!r}, the store has {have}")
        arrays.append((arr, [have.index(b) for b in bands]))
    return arrays


def encoder_chips(arrays: list, rows=slice(None)) -> np.ndarray:
    """The encoder's input for store rows `rows`: its blocks read with the one reader
    (`read_masked`: float32, NaN at nodata) and concatenated on channels."""
    from sarflow.data.chipstore import read_masked

    return np.concatenate([read_masked(arr, rows, idx) for arr, idx in arrays], axis=1)


def _chip_batches(arrays: list, n: int, batch_size: int, prefetch: int = 2, pin: bool = False, start: int = 0,
                  workers: int = 1, readers: int = 0, store: str | None = None):
    """Yields the chips [start, n) in order as float32 tensors of up to `batch_size` chips, the
    channels of `arrays` ((zarr array, band indices) pairs) concatenated, read with the one
    reader (`chipstore.read_masked`: NaN at nodata, integer arrays included).

    `readers` = 0: `workers` background threads of this process read and decompress batches, up
    to `prefetch` + `workers` - 1 batches ahead of the one the caller holds (zarr decodes on one
    event loop under the GIL, so threads add little: see benchmarks/README.md). `readers` = N:
    N reader processes (`_process_batches`), each opening the store `store` (the chip store's
    URI, local or s3://) itself. Either way the batches come in chip order, with `pin` in
    page-locked memory (for non-blocking copies to a GPU), and a reader's error is raised here
    as the reader raised it; closing the generator stops the readers."""
    if readers < 0:
        raise InputError("embed", f"readers must be >= 0 (0: read in this process), got {readers}")
    if readers:
        if store is None:
            raise InputError("embed", "reader processes open the store themselves: give its URI (store=)")
        return _process_batches(store, arrays, n, batch_size, prefetch, pin, start, readers)
    return _thread_batches(arrays, n, batch_size, prefetch, pin, start, workers)


def _batch_tensor(arrays: list, start: int, stop: int, pin: bool = False, shared: bool = False):
    """Chips [start, stop) of `arrays`, channels concatenated, read by `read_masked` into one
    float32 tensor (page-locked with `pin`; with `shared` in shared memory, which a reader
    process hands to its parent without a copy)."""
    import torch

    from sarflow.data.chipstore import chip_shape, read_masked

    shape = (stop - start, sum(len(idx) for _, idx in arrays), *chip_shape(arrays[0][0])[2:])
    if shared:  # as torch's default_collate does in a DataLoader worker
        x = torch.empty(0, dtype=torch.float32)
        x = x.new(x._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")).resize_(shape)
    else:
        x = torch.empty(shape, dtype=torch.float32, pin_memory=pin)
    out, c = x.numpy(), 0
    for arr, idx in arrays:
        out[:, c:c + len(idx)] = read_masked(arr, slice(start, stop), idx)
        c += len(idx)
    return x


@contextmanager
def _decode_whole_batches(batch_size: int):
    """zarr decodes a read's chunks (one chip each) `codec_pipeline.batch_size` at a time: whole
    batches at once read ~4x faster than its default of 1 (a performance knob only). The
    sharding codec looks the setting up on every read and zarr's config is process-wide, so it
    is set once, by the thread that starts the readers, for their whole life (not per read:
    concurrent readers would restore each other's values out of order)."""
    import zarr

    with zarr.config.set({"codec_pipeline.batch_size": batch_size}):
        yield


def _thread_batches(arrays: list, n: int, batch_size: int, prefetch: int, pin: bool, start: int, workers: int):
    if workers < 1:
        raise InputError("embed", f"reader workers must be >= 1, got {workers}")
    starts = range(start, n, batch_size)
    prefetch = prefetch + workers - 1
    with _decode_whole_batches(batch_size):
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sarflow-embed-read")
        try:
            ahead = deque(pool.submit(_batch_tensor, arrays, s, min(n, s + batch_size), pin)
                          for s in starts[:prefetch])
            for i in range(len(starts)):
                if i + prefetch < len(starts):
                    s = starts[i + prefetch]
                    ahead.append(pool.submit(_batch_tensor, arrays, s, min(n, s + batch_size), pin))
                yield ahead.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class _ReaderFailure:
    """An error raised in a reader process, carried to the parent as a value (torch's DataLoader
    would wrap it in a traceback message, and an InputError does not survive plain pickling):
    `exception()` is the same error, its class, message and attributes, for the parent to raise."""

    def __init__(self, e: BaseException):
        self.cls, self.args, self.state = type(e), e.args, dict(getattr(e, "__dict__", {}))

    @classmethod
    def of(cls, e: BaseException) -> "_ReaderFailure":
        import pickle

        failure = cls(e)
        try:
            pickle.loads(pickle.dumps(failure))
        except Exception:  # noqa: BLE001 - an error that cannot travel is sent as its type and message
            failure = cls(RuntimeError(f"{type(e).__name__}: {e}"))
        return failure

    def exception(self) -> BaseException:
        e = self.cls.__new__(self.cls, *self.args)
        e.args = self.args
        e.__dict__.update(self.state)
        return e


class _ReaderBatches:
    """Batch i of the chips [start, n) of the store `store`: what a reader process reads. The
    process opens the store itself (`open_chip_group`: the integrity check, S3 from the
    environment the parent had when it started the readers) on its first batch and keeps it."""

    def __init__(self, store: str, blocks: list[tuple[str, list[int]]], n: int, batch_size: int, start: int):
        self.store, self.blocks, self.n, self.batch_size, self.start = str(store), blocks, n, batch_size, start
        self.env = dict(os.environ)  # a forkserver's children have the server's environment, not ours
        self._arrays = None

    def __len__(self) -> int:
        return len(range(self.start, self.n, self.batch_size))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, i: int):
        try:
            if self._arrays is None:
                self._arrays = self._open()
            s = self.start + i * self.batch_size
            return _batch_tensor(self._arrays, s, min(self.n, s + self.batch_size), shared=True)
        except Exception as e:  # noqa: BLE001 - raised in the parent as it is (see _ReaderFailure)
            return _ReaderFailure.of(e)

    def _open(self) -> list:
        import zarr

        from sarflow.data.chipstore import open_chip_group

        os.environ.clear()
        os.environ.update(self.env)
        # this process's settings, for its life: whole batches decoded at once, on one thread (N readers
        # on N cores: a reader's own decode pool would only contend with the other readers for the cores)
        zarr.config.set({"codec_pipeline.batch_size": self.batch_size, "threading.max_workers": 1})
        group = open_chip_group(self.store)
        return [(group[name], idx) for name, idx in self.blocks]


READER_START = "forkserver"  # reader processes start clean (no inherited threads, event loops or CUDA context)


def _process_batches(store: str, arrays: list, n: int, batch_size: int, prefetch: int, pin: bool, start: int,
                     readers: int):
    """`_chip_batches` with `readers` processes: a torch DataLoader over batch indices (in order,
    `prefetch` batches ahead per reader), each batch read in a reader and handed over in
    shared memory; a reader that dies is an error here, not a hang."""
    from torch.utils.data import DataLoader

    blocks = [(arr.path, list(idx)) for arr, idx in arrays]
    context = multiprocessing.get_context(READER_START)
    if READER_START == "forkserver":  # imported once, in the server: each reader then starts in milliseconds
        context.set_forkserver_preload(["__main__", "torch", "torch.utils.data", __name__, "sarflow.data.chipstore",
                                        "sarflow.data.integrity"])
    loader = DataLoader(_ReaderBatches(store, blocks, n, batch_size, start), batch_size=None, shuffle=False,
                        num_workers=readers, pin_memory=pin, prefetch_factor=max(1, prefetch),
                        multiprocessing_context=context)
    batches = iter(loader)
    try:
        for x in batches:
            if isinstance(x, _ReaderFailure):
                raise x.exception()
            yield x
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise SarflowError(f"{store}: a chip reader process stopped ({str(e).splitlines()[0][:300]}); nothing was "
                           "written; rerun with fewer --readers (each holds batches in memory and /dev/shm)") from None
    finally:
        batches._shutdown_workers()


def store_shards(arrays: list, n: int) -> tuple[int, int]:
    """(chips per shard, number of shards) of the store's chip axis, from the first input array
    (every array of a store shares the chip shard: one writer per shard)."""
    arr = arrays[0][0]
    step = int(arr.shards[0]) if getattr(arr, "shards", None) else int(arr.chunks[0])
    return step, -(-n // step)


def shard_ranges(store: str, parts: int) -> list[list[int]]:
    """The store's chip shards split into up to `parts` contiguous [a, b) ranges of near-equal size:
    the work list of an embedding fan-out (one `embed --shards a:b` task each)."""
    from sarflow.data.chipstore import input_modalities, open_chip_group

    group = open_chip_group(store)
    n = int(group.attrs["chips"])
    arr = group[input_modalities(group, where=store)[0]]
    _, total = store_shards([(arr, [])], n)
    if parts < 1:
        raise InputError(store, f"parts must be >= 1, got {parts}")
    bounds = np.linspace(0, total, min(parts, total) + 1).round().astype(int)
    return [[int(a), int(b)] for a, b in zip(bounds[:-1], bounds[1:])]


def parse_shards(text: str) -> tuple[int, int]:
    """`a:b` -> (a, b), the shard range [a, b) of `sarflow embed --shards`."""
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise InputError(text, "--shards takes A:B, the store shards [A, B) (e.g. 0:8)") from None
    return a, b


def staging(root: str | Path, model: ModelRef | None = None, name: str | None = None,
            version: str | None = None) -> str | Path:
    """Where the parts of a fanned-out run wait for `finalize_embeddings`, outside every source folder."""
    name, version = (model.name, model.version) if model is not None else (name, version)
    return join(root, EMBEDDINGS, STAGING, f"model={name}", f"version={version}")


STAGING = ".staging"
PUBLISHING = "_publishing"  # an S3 partition being published: readers skip it until it is removed
PART_KEY = b"sarflow.part"


@contextmanager
def folder_replaced(out: Path):
    """A local folder written whole or not at all: the block fills a hidden sibling, which then
    replaces `out` by one rename; on any error (or a kill) no half-written `out` is left and the
    sibling is removed; one a killed run left behind is removed by the next run, except an old
    folder moved aside whose replacement never arrived: that one is put back)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(".partial-*"):  # .partial-<pid>-<random>: a writer of this machine
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not alive(int(pid)):
            if "-old-" in stale.name:  # killed between moving the old folder aside and the rename
                for moved in stale.iterdir():
                    if not (out.parent / moved.name).exists():
                        os.replace(moved, out.parent / moved.name)
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".partial-{os.getpid()}-"))
    try:
        yield tmp
        if out.exists():  # the old folder moves aside first: a reader sees the old or the new one, whole
            trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".partial-{os.getpid()}-old-"))
            os.replace(out, trash / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(trash / out.name, out)  # the old folder back at once
                trash.rmdir()
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def s3_outage_named(where: str | Path, rows: int):
    """A failure of the S3 endpoint while embeddings are written to an s3:// root: one StorageError
    naming the destination, the endpoint, the cause, what is left and how to retry (not a botocore trace)."""
    try:
        yield
    except SarflowError:
        raise
    except Exception as e:  # noqa: BLE001 - s3fs/botocore raise many types for one outage
        if not is_remote(where):
            raise
        from sarflow.data.storage import s3_settings

        cause = f"{type(e).__name__}: {e}"
        raise StorageError(str(where), f"writing {rows} chips' embeddings to the S3 endpoint {s3_settings().endpoint_url} "
                                       f"failed ({cause[:300]}); they were computed but not published (the partition "
                                       "is as it was; an --overwrite run may have replaced its part-00000 only); rerun "
                                       "the same `sarflow embed` when the endpoint answers") from None


def embed_store(store: str, model_uri: str, root: str | Path, batch_size: int = 256, overwrite: bool = False,
                device: str | None = None, shards: tuple[int, int] | None = None, workers: int = 1,
                readers: int = 0) -> dict:
    """Embeds every chip (or, with `shards=(a, b)`, the chips of store shards [a, b) into a
    staged part, see the module doc); returns the partition (or part) path, rows, dimension,
    device and throughput.

    Reading and decompressing chips runs ahead of the forward passes (`_chip_batches`): in
    `readers` processes, each opening the store itself, or with `readers=0` in `workers`
    background threads of this process; the chips and so the embeddings are the same either way. On CUDA the batches are pinned and copied without blocking, the forward
    runs under bf16 autocast, the embeddings are copied back without blocking into one pinned
    host array, and the host waits for the device once, after the last batch.

    Timings: `loop_s` is the embedding loop (reading, forward passes, copies back), `write_s`
    building the Arrow table and writing the Parquet partition; `chips_per_s` is
    rows / (loop_s + write_s), i.e. including the write, and `chips_per_s_loop` rows / loop_s.
    """
    import mlflow
    import torch

    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.data.chipstore import open_chip_group, read_chip_table

    group = open_chip_group(store)  # before the model is loaded: a missing or damaged store is the cheaper answer
    model = resolve_model(model_uri)
    try:
        check_root(root)
    except StorageError as e:
        raise StorageError(e.where, f"{e.cause}; nothing was embedded or written; rerun the same `sarflow embed` when "
                                    "the endpoint answers") from None
    out = partition(root, model)
    if exists(out) and not overwrite:
        raise InputError(str(out), f"embeddings of {model.name} v{model.version} already exist (use --overwrite)")
    n_all = int(group.attrs["chips"])
    table = read_chip_table(store).sort_values("index")
    if not np.array_equal(table["index"].to_numpy(), np.arange(n_all)):
        raise InputError(store, f"chips.parquet's index column is not the rows 0..{n_all - 1} of the arrays")
    encoder = mlflow.pytorch.load_model(model.uri, map_location="cpu")
    arrays = encoder_arrays(group, encoder, store)
    per_shard, n_shards = store_shards(arrays, n_all)
    first, n = 0, n_all
    if shards is not None:
        a, b = int(shards[0]), int(shards[1])
        if not 0 <= a < b <= n_shards:
            raise InputError(store, f"shard range {a}:{b} is not within the store's {n_shards} shards "
                                    f"({per_shard} chips each): use A:B with 0 <= A < B <= {n_shards}")
        first, n = a * per_shard, min(b * per_shard, n_all)
        table = table.iloc[first:n]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    encoder = encoder.to(device).eval()
    lineage = dataset_lineage(store)
    dataset_version = lineage["sarflow.dataset_dvc_md5"]
    rows = n - first
    t0 = time.perf_counter()
    host = None  # (rows, dim) float32, pinned on CUDA, allocated once the dimension is known
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda), \
            closing(_chip_batches(arrays, n, batch_size, pin=cuda, start=first, workers=workers, readers=readers,
                                  store=store)) as batches:
        start = 0
        for x in batches:
            e = encoder(x.to(device, non_blocking=cuda)).float()
            if host is None:
                host = torch.empty((rows, e.shape[1]), dtype=torch.float32, pin_memory=cuda)
            host[start:start + len(x)].copy_(e, non_blocking=cuda)
            start += len(x)
    if cuda:
        torch.cuda.synchronize(device)
    emb = host.numpy()
    loop_s = time.perf_counter() - t0
    dim = emb.shape[1]
    t1 = time.perf_counter()
    arrow = _embedding_table(table, emb, model, dataset_version)
    with s3_outage_named(staging(root, model) if shards is not None else out, rows):
        if shards is not None:
            meta = {"model": model.name, "version": model.version, "dataset_version": dataset_version, "dim": dim,
                    "shards": [a, b], "shards_total": n_shards, "chips_per_shard": per_shard, "rows": [first, n],
                    "chips_total": n_all}
            arrow = arrow.replace_schema_metadata({**arrow.schema.metadata, PART_KEY: json.dumps(meta).encode()})
            out = join(staging(root, model), f"part-{a:06d}-{b:06d}.parquet")
            write_table_atomic(arrow, out, row_group_size=65536)  # a rerun of the range replaces its part
        elif is_remote(out):
            write_table_atomic(arrow, f"{out}/part-00000.parquet", row_group_size=65536)
            fs = filesystem()
            for stale in parquet_files(out):  # an overwritten partition keeps only the new file
                if not str(stale).endswith("/part-00000.parquet"):
                    fs.rm(str(stale)[len("s3://"):])
        else:
            with folder_replaced(out) as tmp:
                pq.write_table(arrow, tmp / "part-00000.parquet", row_group_size=65536)
    write_s = time.perf_counter() - t1
    log.info("embedded %d chips with %s v%s in %.1fs + %.1fs writing (%.0f chips/s)", rows, model.name, model.version,
             loop_s, write_s, rows / (loop_s + write_s))
    result = {"partition": str(out), "rows": rows, "dim": dim, "model": model.name, "version": model.version,
              "dataset_version": dataset_version, "device": device, "workers": workers, "readers": readers, "loop_s": loop_s,
              "write_s": write_s, "chips_per_s": rows / max(loop_s + write_s, 1e-9),
              "chips_per_s_loop": rows / max(loop_s, 1e-9)}
    if shards is not None:
        result.update(part=result.pop("partition"), shards=[a, b], shards_total=n_shards)
    return result


def _embedding_table(table, emb: np.ndarray, model: ModelRef, dataset_version: str) -> pa.Table:
    """The GeoParquet table of embeddings `emb` of the chips of `table` (chips.parquet rows, in order)."""
    n, dim = emb.shape
    wkb = [bytes(b) for b in table["geometry"]]  # the chips' footprints in EPSG:4326, as chips.parquet has them
    centroids = shapely.centroid(shapely.from_wkb(np.asarray(wkb, dtype=object)))
    lon, lat = shapely.get_x(centroids), shapely.get_y(centroids)
    ts = datetime.now(timezone.utc).replace(microsecond=0)
    arrow = pa.table({
        "chip_id": pa.array(table["chip_id"].tolist(), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), dim).cast(pa.list_(pa.float32())),
        "model_name": pa.array([model.name] * n, pa.string()),
        "model_version": pa.array([model.version] * n, pa.string()),
        "dataset_version": pa.array([dataset_version] * n, pa.string()),
        "event_timestamp": pa.array([ts] * n, pa.timestamp("us", tz="UTC")),
        "lon": pa.array(lon, pa.float64()),
        "lat": pa.array(lat, pa.float64()),
        "split": pa.array(table["split"].tolist(), pa.string()),
        "geometry": pa.array(wkb, pa.binary()),
    })
    return arrow.replace_schema_metadata({b"geo": json.dumps(geoparquet_metadata(wkb)).encode()})


def finalize_embeddings(root: str | Path, model_name: str, version: str, overwrite: bool = False) -> dict:
    """Publishes the staged parts of `model_name` v`version` as its partition (see the module doc).

    Refuses, naming the files, parts of another model, version, dataset version, store or
    dimension, overlapping ranges and missing shard ranges; nothing is published then. Returns
    the partition, its files, rows and shards."""
    check_root(root)
    where = staging(root, name=model_name, version=str(version))
    out = partition(root, ModelRef(uri="", name=model_name, version=str(version)))
    if exists(out) and not overwrite:
        raise InputError(str(out), f"embeddings of {model_name} v{version} already exist (use --overwrite)")
    parts = parquet_files(where)
    if not parts:
        raise InputError(str(where), f"no staged parts of {model_name} v{version} (run `sarflow embed --shards A:B` first)")
    metas = []
    for f in parts:
        fs, p = fs_path(f)
        md = pq.read_schema(p, filesystem=fs).metadata or {}
        if PART_KEY not in md:
            raise InputError(str(f), "not a part written by `sarflow embed --shards` (no sarflow.part metadata)")
        metas.append((json.loads(md[PART_KEY]), f))
    ref = metas[0][0]
    same = ("model", "version", "dataset_version", "dim", "shards_total", "chips_per_shard", "chips_total")
    for meta, f in metas:
        diff = [k for k in same if meta[k] != ref[k]]
        if diff:
            raise InputError(str(f), f"this part differs from {metas[0][1]} in {', '.join(f'{k} ({meta[k]} vs {ref[k]})' for k in diff)}")
    metas.sort(key=lambda m: tuple(m[0]["shards"]))
    at = 0
    for meta, f in metas:
        a, b = meta["shards"]
        if a < at:
            raise InputError(str(f), f"shards {a}:{b} overlap the part before it (which ends at shard {at})")
        if a > at:
            raise InputError(str(where), f"shards {at}:{a} of {ref['shards_total']} have no part (embed them with --shards {at}:{a})")
        at = b
    if at != ref["shards_total"]:
        raise InputError(str(where), f"shards {at}:{ref['shards_total']} of {ref['shards_total']} have no part "
                                     f"(embed them with --shards {at}:{ref['shards_total']})")
    names = [f"part-{i:05d}.parquet" for i in range(len(metas))]
    if is_remote(out):
        fs = filesystem()
        key = str(out)[len("s3://"):]
        try:
            fs.pipe(f"{key}/{PUBLISHING}", b"")
            for (_, f), name in zip(metas, names):
                fs.copy(str(f)[len("s3://"):], f"{key}/{name}")
            for stale in parquet_files(out):
                if str(stale).rsplit("/", 1)[1] not in names:
                    fs.rm(str(stale)[len("s3://"):])
            fs.rm(f"{key}/{PUBLISHING}")
        except Exception as e:  # noqa: BLE001 - s3fs/botocore raise many types for one outage
            from sarflow.data.storage import s3_settings

            raise StorageError(str(out), f"publishing {len(names)} staged parts of {model_name} v{version} to the S3 "
                                         f"endpoint {s3_settings().endpoint_url} failed ({type(e).__name__}: {str(e)[:300]}); "
                                         f"the partition may be left marked {PUBLISHING} (every reader skips it) and the "
                                         f"staged parts are kept under {where}; rerun `sarflow embed --finalize --model "
                                         f"models:/{model_name}/{version} --overwrite` when the endpoint answers") from None
        fs.rm(str(where)[len("s3://"):], recursive=True)
    else:
        with folder_replaced(out) as tmp:
            for (_, f), name in zip(metas, names):
                shutil.copyfile(f, tmp / name)
        shutil.rmtree(where)
    log.info("published %d parts of %s v%s (%d chips) at %s", len(names), model_name, version, ref["chips_total"], out)
    return {"partition": str(out), "files": names, "rows": ref["chips_total"], "shards": ref["shards_total"],
            "model": model_name, "version": str(version), "dataset_version": ref["dataset_version"]}


def read_embeddings(root: str | Path, model_name: str, version: str) -> pa.Table:
    path = join(root, EMBEDDINGS, f"model={model_name}", f"version={version}")
    return read_partition(path, f"no embeddings for {model_name} v{version}")


def read_partition(path: str | Path, missing: str = "no embeddings here") -> pa.Table:
    if is_remote(path) and exists(join(path, PUBLISHING)):
        raise InputError(str(path), "the partition is being published (a `_publishing` marker): retry when "
                                    "`sarflow embed --finalize` is done")
    files = parquet_files(path)
    if not files:
        raise InputError(str(path), missing)
    fs, _ = fs_path(path)
    return pq.read_table([fs_path(f)[1] for f in files], filesystem=fs)


def embedding_matrix(table: pa.Table) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    dim = len(col[0]) if len(col) else 0
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)


def embedding_partitions(root: str | Path) -> list[tuple[str, str, str | Path]]:
    """(model, version, partition folder) of every non-empty partition, by model name and then
    version number (so v10 comes after v2): the last of a model is its newest."""
    if is_remote(root):
        fs, base = fs_path(join(root, EMBEDDINGS))
        try:
            files = fs.glob(base.rstrip("/") + "/model=*/version=*/*.parquet")
            publishing = {f.rsplit("/", 1)[0] for f in fs.glob(base.rstrip("/") + f"/model=*/version=*/{PUBLISHING}")}
        except FileNotFoundError:
            files, publishing = [], set()
        folders = sorted({f.rsplit("/", 1)[0] for f in files if not f.rsplit("/", 1)[1].startswith((".", "_"))} - publishing)
        found = [(d.rsplit("/", 2)[1].split("=", 1)[1], d.rsplit("/", 1)[1].split("=", 1)[1], "s3://" + d)
                 for d in folders]
        return sorted(found, key=_partition_order)
    base = Path(root) / EMBEDDINGS
    out = []
    for mdir in sorted(base.glob("model=*")):
        for vdir in sorted(mdir.glob("version=*")):
            if parquet_files(vdir):
                out.append((mdir.name.split("=", 1)[1], vdir.name.split("=", 1)[1], vdir))
    return sorted(out, key=_partition_order)


def _partition_order(part: tuple) -> tuple:
    model, version = part[0], part[1]
    return (model, int(version) if str(version).isdigit() else -1, str(version))


def select_partition(root: str | Path, model: str | None = None, version: str | None = None) -> tuple[str, str, str | Path]:
    """The embeddings partition (model, version, folder) to use: the named one, else the newest
    version of the named model, else the last partition (models by name, versions by number)."""
    parts = embedding_partitions(root)
    if model:
        parts = [p for p in parts if p[0] == model]
    if version is not None:
        parts = [p for p in parts if p[1] == str(version)]
    if not parts:
        raise InputError(str(join(root, EMBEDDINGS)),
                         f"no embeddings for {model or 'any model'}{f' v{version}' if version else ''} under this root "
                         "(run `sarflow embed` first)")
    return parts[-1]
