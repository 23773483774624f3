"""One config path: params.yaml -> one section per stage -> its typed config, flags on top.

Every key of the project's params.yaml is read by some stage config, every field of every stage
config can be set from params.yaml, an unknown key or section is refused naming the key and the
file (through the real CLI, exit code 2), the pipelines receive every key (nothing dropped), and
$MLFLOW_TRACKING_URI is the tracking default wherever no URI is given.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sarflow.cli.common import STAGE_CONFIGS, check_params, config_class, stage_config
from sarflow.errors import InputError
from sarflow.params import TRACKING_DEFAULT, Params, default_tracking_uri, load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def _required(cls) -> dict:
    """Placeholders for the fields a command supplies itself (the store path, ...)."""
    return {f.name: "x" for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def _norm(value):
    if dataclasses.is_dataclass(value):
        return _norm(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _norm(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# a value other than the default for fields whose default says nothing about the type (None, {}, a choice)
SPECIAL = {
    "output_size": 224, "groups": [["s1", "s1grd", None]], "depth": 3, "dim": 48, "heads": 4,
    "methods": {"mae": {"mask_ratio": 0.5}}, "method_kwargs": {"mask_ratio": 0.5}, "class_prior_scale": {10: 2.0},
    "online": "redis", "repo": "/tmp/sarflow-test-repo", "device": "cpu", "devices": 2, "model": "m", "version": "3",
    "threads": 2, "out_dir": "/tmp/out", "method": "dino", "size": "small", "accelerator": "cpu", "loss": "mse",
    "stats": "stats.csv", "label_raster": "labels.tif", "label_nodata": 0.0, "features_root": "/tmp/features",
    "classes": [10, 20], "encoder_uri": "models:/enc/1", "label_fractions": [0.5], "head": "linear",
    "modalities": ["s1grd", "s2rgb"], "scratch_tasks": ["worldcover"], "task": "llp-x", "label_modality": "x",
    "tasks": ["worldcover"], "truth_modality": "worldcover", "pixel_modalities": ["s1grd"],
    "registry": "postgresql+psycopg2://postgres@127.0.0.1:5432/test", "lock_uri": "postgresql://postgres@127.0.0.1/test",
    "codec": "lz4",
}


def _other_value(name: str, default):
    if name in SPECIAL:
        return SPECIAL[name]
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default + 0.25
    if isinstance(default, str):
        return default + "-x"
    if isinstance(default, (list, tuple)) and len(default) > 1:
        return list(default)[::-1]
    if isinstance(default, (list, tuple)):
        return list(default) * 2
    raise AssertionError(f"no test value for field {name!r} (default {default!r}): add one to SPECIAL")


# ---------------------------------------------------------------- params.yaml <-> stage configs

def test_every_params_key_is_read_by_a_stage_config():
    params = load_params(PARAMS)
    assert set(params) <= set(STAGE_CONFIGS), "params.yaml has a section no stage reads"
    check_params(params)  # builds every section with its config: an unknown key would raise
    for section, values in params.items():
        cls = config_class(section)
        cfg = stage_config(section, params, **_required(cls))
        for key, value in values.items():
            assert hasattr(cfg, key), f"params.yaml {section}.{key} is read by no field of {cls.__name__}"
            if value is not None and not isinstance(value, dict):
                got = _norm(getattr(cfg, key))
                # a local path may be stored resolved against the working directory (features.root)
                assert got in (_norm(value), str(Path(str(value)).resolve())), f"{section}.{key} did not reach {cls.__name__}"


def test_every_stage_has_its_section_in_params_yaml():
    assert set(load_params(PARAMS)) == set(STAGE_CONFIGS)


@pytest.mark.parametrize("section", sorted(STAGE_CONFIGS))
def test_every_stage_config_field_can_be_set_from_params(section):
    cls = config_class(section)
    required = _required(cls)
    default = cls(**required)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        current = getattr(default, f.name)
        if dataclasses.is_dataclass(hints.get(f.name)) or dataclasses.is_dataclass(current):
            sub = dataclasses.fields(current)
            for g in sub:
                value = _other_value(g.name, getattr(current, g.name))
                cfg = stage_config(section, Params({section: {f.name: {g.name: value}}}, "p.yaml"),
                                   **{k: v for k, v in required.items()})
                assert _norm(getattr(getattr(cfg, f.name), g.name)) == _norm(value), f"{section}.{f.name}.{g.name}"
            continue
        value = "from-params" if f.name in required else _other_value(f.name, current)
        given = {k: v for k, v in required.items() if k != f.name}
        cfg = stage_config(section, Params({section: {f.name: value}}, "p.yaml"), **given)
        assert _norm(getattr(cfg, f.name)) == _norm(value), f"{section}.{f.name} cannot be set from params.yaml"


def test_flags_override_params_and_nested_sections_merge():
    params = Params({"pretrain": {"batch_size": 4, "vit": {"size": "tiny", "depth": 2}, "optim": {"lr": 0.01}}}, "p.yaml")
    cfg = stage_config("pretrain", params, {"batch_size": 8, "vit": {"depth": 3, "dim": None}, "optim": {"max_steps": 7}},
                       store="s")
    assert cfg.batch_size == 8 and cfg.vit.depth == 3 and cfg.vit.size == "tiny"
    assert cfg.optim.lr == 0.01 and cfg.optim.max_steps == 7 and cfg.store == "s"
    # per-method arguments: those of the chosen method apply
    cfg = stage_config("pretrain", Params({"pretrain": {"method": "dino", "methods": {"dino": {"out_dim": 8},
                                                                                      "mae": {"mask_ratio": 0.5}}}}),
                       store="s")
    assert cfg.method_kwargs == {"out_dim": 8}


def test_unknown_and_bad_keys_name_the_key_and_the_file(tmp_path):
    params = Params({"tile": {"shard_chips": 8, "shard_chip": 4}}, "p.yaml")
    with pytest.raises(InputError) as e:
        stage_config("tile", params)
    assert "p.yaml" in str(e.value) and "tile.shard_chip: unknown key" in str(e.value) and "shard_chips" in str(e.value)
    with pytest.raises(InputError, match=r"p.yaml: pretrain.vit.width: unknown key \(known: .*depth"):
        stage_config("pretrain", Params({"pretrain": {"vit": {"width": 3}}}, "p.yaml"), store="s")
    with pytest.raises(InputError, match=r"p.yaml: tile.workers: .*integer.*'many'"):
        stage_config("tile", Params({"tile": {"workers": "many"}}, "p.yaml"))
    with pytest.raises(InputError, match=r"p.yaml: features.online: "):
        stage_config("features", Params({"features": {"online": "memcached"}}, "p.yaml"))
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"synth": {"seed": 1}, "tiles": {"workers": 1}}))
    with pytest.raises(InputError, match=r"params.yaml: tiles: unknown section \(known: .*tile"):
        check_params(load_params(bad))


# ---------------------------------------------------------------- through the real CLI

def _sarflow(args, **kw):
    from sarflow.cli.main import app

    return CliRunner().invoke(app, args, **kw)


@pytest.mark.parametrize("params, command, message", [
    ({"synth": {"size_px": 64, "sise_px": 32}}, ["synth", "{tmp}/scene"], "synth.sise_px: unknown key"),
    ({"tile": {"split_fraction": [0.5, 0.5, 0.0]}}, ["tile", "{tmp}/c.yaml", "--out", "{tmp}/s.zarr"],
     "tile.split_fraction: unknown key"),
    ({"pretrain": {"vit": {"deep": 2}}}, ["pretrain", "{tmp}/s.zarr"], "pretrain.vit.deep: unknown key"),
    ({"embed": {"batch": 2}}, ["embed", "{tmp}/s.zarr", "--model", "models:/m/1"], "embed.batch: unknown key"),
    ({"features": {"rot": "x"}}, ["features", "apply"], "features.rot: unknown key"),
    ({"promote": {"margins": 0.1}}, ["promote", "m", "--metric", "f1"], "promote.margins: unknown key"),
    ({"synthh": {"seed": 1}}, ["synth", "{tmp}/scene"], "synthh: unknown section"),
    ({"tile": {"shard_chips": 8, "wokers": 2}}, ["pipeline", "compile", "data", "--out", "{tmp}/d.yaml"],
     "tile.wokers: unknown key"),
    ({"extra": {}}, ["pipeline", "compile", "e2e", "--out", "{tmp}/d.yaml"], "extra: unknown section"),
])
def test_cli_refuses_an_unknown_key_naming_key_and_file(tmp_path, params, command, message):
    path = tmp_path / "my-params.yaml"
    path.write_text(yaml.safe_dump(params))
    res = _sarflow([a.replace("{tmp}", str(tmp_path)) for a in command] + ["--params", str(path)])
    assert res.exit_code == 2, res.output
    assert message in res.output and "my-params.yaml" in res.output, res.output


def test_a_pipeline_refuses_a_key_it_would_drop(tmp_path):
    """tile.overwrite is a TileOptions field, but no parameter of the data pipeline: refused, not dropped."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"tile": {"overwrite": True}}))
    res = _sarflow(["pipeline", "compile", "data", "--out", str(tmp_path / "d.yaml"), "--params", str(path)])
    assert res.exit_code == 2 and "tile.overwrite" in res.output and "no parameter" in res.output, res.output


# ---------------------------------------------------------------- pipelines get every key

@pytest.mark.parametrize("name", ["data", "training", "e2e", "e2e-catalog"])
def test_pipelines_receive_every_key_of_their_sections(name):
    from pipelines import load
    from sarflow.mlops.kfp_runner import arguments_from_params, params_sections

    pipeline = load(name)
    params = load_params(PARAMS)
    args = arguments_from_params(pipeline, params)  # raises on a key the pipeline would drop
    for section in params_sections(pipeline):
        if section in args:
            assert args[section] == {k: v for k, v in params[section].items() if v is not None} or section == "pretrain"
        else:
            for key, value in params[section].items():
                assert value is None or key in args or (name == "data" and f"{section}.{key}" == "synth.seed"), \
                    f"{name}: {section}.{key} is dropped"
    if name in ("data", "e2e", "e2e-catalog"):
        assert args["split_fractions"] == [0.8, 0.1, 0.1] and args["split_block"] == 0
    if name != "data":
        assert "embed" in args and args["margin"] == 0.0


def test_split_fractions_reach_the_tile_component(tmp_path):
    from pipelines import load
    from sarflow.mlops.kfp_runner import compile_pipeline

    out = compile_pipeline(load("data"), tmp_path / "d.yaml", defaults={"split_fractions": [0.6, 0.2, 0.2],
                                                                       "seasons": ["summer"]})
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["split_fractions"]["defaultValue"] == [0.6, 0.2, 0.2]
    tile_inputs = spec["components"]["comp-tile-scene"]["inputDefinitions"]["parameters"]
    assert {"split_fractions", "split_block", "clevel"} <= set(tile_inputs)
    assert "seasons" in spec["components"]["comp-synth-scene"]["inputDefinitions"]["parameters"]


# ---------------------------------------------------------------- the tracking default

def test_mlflow_tracking_uri_is_the_default_when_set(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == TRACKING_DEFAULT
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert default_tracking_uri() == uri
    for section in STAGE_CONFIGS:
        cls = config_class(section)
        if "tracking_uri" in {f.name for f in dataclasses.fields(cls)}:
            assert stage_config(section, load_params(PARAMS), **_required(cls)).tracking_uri == uri, section
            # a URI in params.yaml, or a flag, still wins
            assert stage_config(section, Params({section: {"tracking_uri": "http://x"}}),
                                **_required(cls)).tracking_uri == "http://x"


@pytest.mark.slow
def test_a_command_tracks_to_mlflow_tracking_uri(monkeypatch, tmp_path):
    """`sarflow promote` without --tracking-uri opens the store $MLFLOW_TRACKING_URI names."""
    db = tmp_path / "env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    res = _sarflow(["promote", "sarflow-nothing", "--metric", "f1"])
    assert res.exit_code == 2 and "sarflow-nothing" in res.output, res.output
    assert db.is_file() and not (tmp_path / "mlflow.db").exists()
