"""The catalog contract (DESIGN.md): a `grid` and a list of `sources`, loaded from YAML.

Paths in a catalog are relative to the catalog file. Unknown keys and wrong types are
refused with a message that names the catalog file and the offending field.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import date as Date
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sarflow.data.legends import LEGENDS
from sarflow.errors import CatalogError

Role = Literal["input", "label"]
Units = Literal["dB", "linear", "amplitude", "coherence", "radians", "reflectance", "class", "percent", "m"]
Kind = Literal["continuous", "categorical"]
ResamplingName = Literal["nearest", "bilinear", "cubic", "average", "mode", "min", "max", "med"]
CATEGORICAL_SAFE = {"nearest", "mode", "min", "max", "med"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassSpec(_Strict):
    """One class of a categorical label: its name and, optionally, a colour for maps."""

    name: str = Field(min_length=1)
    color: str | None = Field(default=None, pattern=r"^#[0-9a-fA-F]{6}$")


class StacRef(_Strict):
    """STAC items (paths or s3:// URIs of item JSON) and the asset keys that become the bands."""

    items: list[str] = Field(min_length=1)
    assets: list[str] = Field(min_length=1)


class GridSpec(_Strict):
    crs: str | int = Field(description="EPSG code (e.g. 32630, 'EPSG:32630') or 'utm' for the AOI centroid's zone")
    resolution: float = Field(gt=0, description="pixel size in grid CRS units")
    chip_size: int = Field(ge=8, le=4096, description="chip side in pixels")
    aoi: str | list[float] = Field(
        default="intersection",
        description="GeoJSON path, WGS84 bbox [minlon, minlat, maxlon, maxlat], 'intersection' or 'union'",
    )
    overlap: int = Field(default=0, ge=0, description="pixels shared by neighbouring chips")
    origin: tuple[float, float] = Field(
        default=(0.0, 0.0), description="a grid corner (x, y); chips are anchored on origin + k * stride"
    )

    @field_validator("aoi")
    @classmethod
    def _check_aoi(cls, v):
        if isinstance(v, list):
            if len(v) != 4:
                raise ValueError("a bbox AOI needs 4 numbers [minlon, minlat, maxlon, maxlat]")
            if not (v[0] < v[2] and v[1] < v[3]):
                raise ValueError(f"bbox AOI {v} is empty (min must be below max)")
            lon = [x for x in (v[0], v[2]) if not -180.0 <= x <= 180.0]
            lat = [x for x in (v[1], v[3]) if not -90.0 <= x <= 90.0]
            if lon or lat:
                bad = ([f"longitude {x:g} outside [-180, 180]" for x in lon]
                       + [f"latitude {x:g} outside [-90, 90]" for x in lat])
                raise ValueError(f"bbox AOI {v} is in WGS84 degrees [minlon, minlat, maxlon, maxlat]: "
                                 + ", ".join(bad))
        return v

    @field_validator("crs")
    @classmethod
    def _check_crs(cls, v):
        if v == "utm":
            return v
        from pyproj import CRS
        from pyproj.exceptions import CRSError

        try:
            if isinstance(v, int) or v.isdigit():
                CRS.from_epsg(int(v))
            else:
                CRS.from_user_input(v)
        except CRSError:
            raise ValueError(f"{v!r} is not a known CRS (give an EPSG code such as 32630 or 'EPSG:32630', "
                             "or 'utm')") from None
        return v

    @model_validator(mode="after")
    def _check_overlap(self):
        if self.overlap >= self.chip_size:
            raise ValueError(f"overlap {self.overlap} must be smaller than chip_size {self.chip_size}")
        return self

    @property
    def stride(self) -> int:
        return self.chip_size - self.overlap


class SourceSpec(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="modality id, e.g. s1grd, s2rgb, worldcover")
    uris: list[str | list[str]] | None = Field(
        default=None,
        description="files mosaicked in order (later ones win); an item that is a list stacks single-band files",
    )
    stac: StacRef | None = None
    bands: list[str] = Field(min_length=1)
    units: Units
    kind: Kind
    nodata: float | None = Field(default=None, description="overrides the files' own nodata")
    resampling: ResamplingName | None = None
    date: Date | None = None
    required: bool = Field(default=True, description="chips without any valid pixel of a required source are skipped")
    role: Role | None = Field(
        default=None,
        description="'input' (a model reads it) or 'label' (tasks are derived from it); default: label when "
        "categorical with classes or a legend, or continuous with a range; input otherwise",
    )
    legend: str | None = Field(default=None, description=f"a well-known class legend: {sorted(LEGENDS)}")
    classes: dict[int, ClassSpec | str] | None = Field(
        default=None, description="categorical labels: code -> name (or {name, color})"
    )
    range: tuple[float, float] | None = Field(
        default=None, description="continuous labels: the valid [min, max] in `units` (values outside are nodata)"
    )
    store_resolution: float | None = Field(
        default=None, gt=0,
        description="pixel size the chip store keeps this source at (grid CRS units): the grid resolution times a "
        "whole k dividing chip_size (and the stride); the reader upsamples it to the chip grid (nearest)",
    )

    def store_factor(self, resolution: float) -> int:
        """k: the source is stored at k times the grid `resolution` (1: full resolution)."""
        return 1 if self.store_resolution is None else int(round(self.store_resolution / resolution))

    @property
    def effective_role(self) -> Role:
        if self.role is not None:
            return self.role
        return "label" if (self.legend or self.classes or self.range is not None) else "input"

    def class_table(self) -> list[dict]:
        """The declared classes as [{code, name, color}] in code order (from `classes` or `legend`)."""
        if self.classes is not None:
            table = {c: (v if isinstance(v, ClassSpec) else ClassSpec(name=v)) for c, v in self.classes.items()}
            return [{"code": c, "name": v.name, "color": v.color} for c, v in sorted(table.items())]
        if self.legend is not None:
            return [{"code": c, "name": n, "color": col} for c, (n, col) in sorted(LEGENDS[self.legend].items())]
        return []

    @model_validator(mode="after")
    def _check_label(self):
        if self.legend is not None and self.legend not in LEGENDS:
            raise ValueError(f"source {self.name!r}: unknown legend {self.legend!r} (known: {sorted(LEGENDS)}; "
                             "or list the classes as code: name)")
        if self.legend is not None and self.classes is not None:
            raise ValueError(f"source {self.name!r}: give either 'legend' or 'classes', not both")
        if (self.legend or self.classes) and self.kind != "categorical":
            raise ValueError(f"source {self.name!r}: classes or a legend need kind 'categorical'")
        if self.range is not None:
            if self.kind != "continuous":
                raise ValueError(f"source {self.name!r}: 'range' is for continuous labels")
            if not self.range[0] < self.range[1]:
                raise ValueError(f"source {self.name!r}: range {list(self.range)} is empty (min must be below max)")
        if self.kind == "categorical" and self.role is None and not (self.legend or self.classes):
            raise ValueError(
                f"source {self.name!r} is categorical: say what it is, a label with its classes (code: name) or a "
                f"well-known legend ({', '.join(sorted(LEGENDS))}), or 'role: input' for a categorical input layer"
            )
        if self.effective_role == "label":
            if len(self.bands) != 1:
                raise ValueError(f"source {self.name!r}: a label source has one band (it has {len(self.bands)})")
            if self.kind == "categorical":
                table = self.class_table()
                if len(table) < 2:
                    raise ValueError(
                        f"source {self.name!r} is a categorical label: declare its classes (code: name, at least two) "
                        f"or a well-known legend ({', '.join(sorted(LEGENDS))})"
                    )
                if self.nodata is not None and any(c["code"] == self.nodata for c in table):
                    raise ValueError(f"source {self.name!r}: nodata {self.nodata:g} is also a class code")
        return self

    @model_validator(mode="after")
    def _check(self):
        if (self.uris is None) == (self.stac is None):
            raise ValueError(f"source {self.name!r} needs exactly one of 'uris' or 'stac'")
        if self.uris is not None and not self.uris:
            raise ValueError(f"source {self.name!r} has an empty 'uris' list")
        if self.stac is not None and len(self.stac.assets) not in (1, len(self.bands)):
            raise ValueError(
                f"source {self.name!r}: {len(self.stac.assets)} STAC assets for {len(self.bands)} bands "
                "(give one multi-band asset or one asset per band)"
            )
        if self.kind == "categorical" and self.resampling and self.resampling not in CATEGORICAL_SAFE:
            raise ValueError(
                f"source {self.name!r} is categorical: resampling {self.resampling!r} would interpolate class codes"
            )
        if self.units == "class" and self.kind != "categorical":
            raise ValueError(f"source {self.name!r} has units 'class' but kind {self.kind!r}")
        return self


class Catalog(_Strict):
    grid: GridSpec
    sources: list[SourceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self):
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique, repeated: {dup}")
        return self

    @model_validator(mode="after")
    def _check_store_resolution(self):
        g = self.grid
        allowed = [k for k in range(1, g.chip_size + 1) if g.chip_size % k == 0 and g.stride % k == 0]
        for s in self.sources:
            if s.store_resolution is None:
                continue
            k = s.store_resolution / g.resolution
            if abs(k - round(k)) > 1e-6 * max(k, 1.0) or round(k) not in allowed:
                cut = f"chip_size {g.chip_size}" + (f" and the stride {g.stride}" if g.overlap else "")
                raise ValueError(
                    f"source {s.name!r}: store_resolution {s.store_resolution:g} must be the grid resolution "
                    f"{g.resolution:g} times a whole k that divides {cut}: allowed "
                    f"{', '.join(f'{k * g.resolution:g}' for k in allowed)}")
        return self

    @property
    def labels(self) -> list[SourceSpec]:
        return [s for s in self.sources if s.effective_role == "label"]

    @property
    def inputs(self) -> list[SourceSpec]:
        return [s for s in self.sources if s.effective_role == "input"]

    def source(self, name: str) -> SourceSpec:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def hash(self) -> str:
        """sha256 of the catalog's canonical JSON: the catalog hash recorded everywhere downstream."""
        data = self.model_dump(mode="json")
        for s in data["sources"]:  # an unset store_resolution, or the grid's own (k = 1: the same store), leaves
            if s.get("store_resolution") in (None, data["grid"]["resolution"]):  # the hash as without the key
                s.pop("store_resolution", None)
        canon = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()


class LoadedCatalog(BaseModel):
    """A catalog together with the file it came from (relative paths resolve against its folder)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    catalog: Catalog
    path: Path

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, uri: str) -> str:
        """A catalog URI as a readable location: s3:// stays, a relative path joins the catalog folder."""
        if "://" in uri:
            return uri
        p = Path(uri).expanduser()
        return str(p if p.is_absolute() else (self.base_dir / p).resolve())


    def relative(self, uri: str) -> str:
        """A resolved URI as recorded in products: relative to the catalog folder for local files,
        so the same inputs give the same store (and dataset version) wherever they sit."""
        if "://" in uri:
            return uri
        return os.path.relpath(uri, self.base_dir)


def catalog_path(where: str | Path, name: str = "catalog.yaml") -> Path:
    """A catalog file given itself or the scene folder that holds it (as a synthetic scene does)."""
    where = Path(where)
    return where / name if where.is_dir() else where


def load_catalog(path: str | Path) -> LoadedCatalog:
    path = Path(path)
    if not path.is_file():
        raise CatalogError(str(path), "catalog file does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CatalogError(str(path), f"not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise CatalogError(str(path), "a catalog must be a mapping with 'grid' and 'sources'")
    try:
        catalog = Catalog.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise CatalogError(str(path), f"invalid catalog: {problems}") from None
    return LoadedCatalog(catalog=catalog, path=path.resolve())


def dump_catalog(catalog: Catalog, path: str | Path) -> None:
    data = catalog.model_dump(mode="json", exclude_defaults=True)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
