"""The catalog contract: strict parsing, clear errors naming the file, a stable hash."""

from __future__ import annotations

import pytest
import yaml

from sarflow.data.catalog import load_catalog
from sarflow.errors import CatalogError

GOOD = {
    "grid": {"crs": "utm", "resolution": 10, "chip_size": 64},
    "sources": [{"name": "s1grd", "uris": ["a.tif"], "bands": ["VV", "VH"], "units": "dB", "kind": "continuous"}],
}


def _write(tmp_path, data, name="catalog.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _bad(tmp_path, mutate):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    mutate(data)
    with pytest.raises(CatalogError) as e:
        load_catalog(_write(tmp_path, data))
    assert str(tmp_path / "catalog.yaml") in str(e.value)
    return str(e.value)


def test_good_catalog_resolves_paths_relative_to_the_catalog(tmp_path):
    loaded = load_catalog(_write(tmp_path, GOOD))
    assert loaded.catalog.grid.stride == 64
    assert loaded.resolve("a.tif") == str(tmp_path / "a.tif")
    assert loaded.resolve("s3://bucket/a.tif") == "s3://bucket/a.tif"


def test_unknown_keys_are_refused(tmp_path):
    assert "colour" in _bad(tmp_path, lambda d: d["sources"][0].update(colour="red"))
    assert "tile_size" in _bad(tmp_path, lambda d: d["grid"].update(tile_size=3))


def test_wrong_types_are_refused(tmp_path):
    assert "resolution" in _bad(tmp_path, lambda d: d["grid"].update(resolution="ten"))
    assert "chip_size" in _bad(tmp_path, lambda d: d["grid"].update(chip_size=[64]))
    assert "units" in _bad(tmp_path, lambda d: d["sources"][0].update(units="furlongs"))
    assert "bands" in _bad(tmp_path, lambda d: d["sources"][0].update(bands="VV"))


def test_inconsistent_values_are_refused(tmp_path):
    assert "overlap" in _bad(tmp_path, lambda d: d["grid"].update(overlap=64))
    assert "interpolate class codes" in _bad(tmp_path, lambda d: d["sources"][0].update(
        kind="categorical", units="class", resampling="bilinear", role="input"))
    assert "exactly one of" in _bad(tmp_path, lambda d: d["sources"][0].pop("uris"))
    assert "unique" in _bad(tmp_path, lambda d: d["sources"].append(dict(d["sources"][0])))
    assert "bbox" in _bad(tmp_path, lambda d: d["grid"].update(aoi=[1, 2, 3]))


def test_not_yaml_and_missing_file(tmp_path):
    p = tmp_path / "catalog.yaml"
    p.write_text("grid: [unclosed")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(p)
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(tmp_path / "nope.yaml")


def test_hash_is_stable_and_sensitive(tmp_path):
    a = load_catalog(_write(tmp_path, GOOD, "a.yaml")).catalog.hash()
    b = load_catalog(_write(tmp_path, GOOD, "b.yaml")).catalog.hash()
    changed = yaml.safe_load(yaml.safe_dump(GOOD))
    changed["grid"]["resolution"] = 20
    c = load_catalog(_write(tmp_path, changed, "c.yaml")).catalog.hash()
    assert a == b != c


def test_label_declarations(tmp_path):
    """A label declares itself: a legend, its own classes, or a continuous range; the role follows."""
    d = yaml.safe_load(yaml.safe_dump(GOOD))
    d["sources"] += [
        {"name": "lc", "uris": ["lc.tif"], "bands": ["c"], "units": "class", "kind": "categorical", "nodata": 0,
         "legend": "worldcover"},
        {"name": "flood", "uris": ["f.tif"], "bands": ["w"], "units": "class", "kind": "categorical", "nodata": -1,
         "classes": {0: "dry", 1: {"name": "water", "color": "#0000ff"}}},
        {"name": "trees", "uris": ["t.tif"], "bands": ["p"], "units": "percent", "kind": "continuous", "range": [0, 100]},
        {"name": "scl", "uris": ["s.tif"], "bands": ["scl"], "units": "class", "kind": "categorical", "role": "input"},
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    cat = load_catalog(path).catalog
    assert [s.name for s in cat.labels] == ["lc", "flood", "trees"]
    assert "scl" in [s.name for s in cat.inputs] and "lc" not in [s.name for s in cat.inputs]
    assert cat.source("flood").class_table() == [{"code": 0, "name": "dry", "color": None},
                                                 {"code": 1, "name": "water", "color": "#0000ff"}]
    wc = cat.source("lc").class_table()
    assert len(wc) == 11 and wc[0]["code"] == 10 and wc[-1]["code"] == 100


def test_bad_label_declarations_are_refused(tmp_path):
    def lab(**kw):
        return lambda d: d["sources"].append({"name": "lab", "uris": ["l.tif"], "bands": ["c"], "units": "class",
                                              "kind": "categorical", **kw})
    assert "say what it is" in _bad(tmp_path, lab())
    assert "unknown legend 'modis'" in _bad(tmp_path, lab(legend="modis"))
    assert "not both" in _bad(tmp_path, lab(legend="igbp", classes={1: "a", 2: "b"}))
    assert "at least two" in _bad(tmp_path, lab(classes={1: "water"}))
    assert "also a class code" in _bad(tmp_path, lab(classes={0: "dry", 1: "water"}, nodata=0))
    assert "range" in _bad(tmp_path, lambda d: d["sources"][0].update(range=[5, 1]))
    assert "one band" in _bad(tmp_path, lambda d: d["sources"][0].update(range=[-30, 5]))
