"""One vocabulary of flags across every `sarflow` command: walks the real click command tree
(typer.main.get_command(app)) and fails on a parameter without help, a retired spelling as a
primary name, a features root not named --features-root, an output not named --out, and a --model
whose help does not state the one rule; the rule itself is checked through its one resolver
(sarflow.mlops.registry.resolve_model_ref) against a real SQLite MLflow registry."""

from __future__ import annotations

import pytest
import typer

from sarflow.cli.main import app

RETIRED = {"--root", "--out-dir", "--output", "--output-dir", "--outdir", "--features", "--feature-root"}
OUTPUT_NAMES = {"out", "out_dir", "output", "output_dir", "outdir", "out_path", "output_path"}
BUILT_IN = {"help", "install_completion", "show_completion"}


def _commands():
    """(command path, click command) of every command and group of the real app."""
    def walk(cmd, path):
        yield path, cmd
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            yield from walk(sub, [*path, name])
    return list(walk(typer.main.get_command(app), ["sarflow"]))


def _params():
    return [(" ".join(path), p) for path, cmd in _commands() for p in cmd.params if p.name not in BUILT_IN]


def _is_option(p) -> bool:
    return type(p).__name__.endswith("Option")


def test_the_walk_sees_every_command_group():
    paths = {path for path, _ in ((" ".join(p), c) for p, c in _commands())}
    for expected in ("sarflow embed", "sarflow features labels", "sarflow downstream probe", "sarflow llp train",
                     "sarflow segment train", "sarflow pipeline run", "sarflow services up", "sarflow tile"):
        assert expected in paths
    assert len(_params()) > 150


def test_every_option_and_argument_has_help():
    missing = [f"{where}: {p.opts}" for where, p in _params() if not (getattr(p, "help", None) or "").strip()]
    assert not missing, "parameters without help text:\n" + "\n".join(missing)


def test_no_retired_spelling_is_a_primary_name():
    bad = [f"{where}: {p.opts}" for where, p in _params() if _is_option(p) and p.opts[0] in RETIRED]
    assert not bad, bad
    # a retired spelling survives only as a second name of the option that replaced it
    for where, p in _params():
        if _is_option(p) and set(p.opts) & RETIRED:
            assert p.opts[0] in ("--features-root", "--out"), (where, p.opts)


def test_a_features_root_is_named_features_root():
    roots = [(where, p) for where, p in _params() if _is_option(p) and
             (p.name in ("root", "features_root") or "features root" in (p.help or "").lower()[:40])]
    assert len(roots) >= 8  # embed, the features group, downstream probe/region, llp train
    for where, p in roots:
        assert p.opts[0].endswith("--features-root") or p.opts[0] == "--other-features-root", (where, p.opts)
        if p.name != "other_features_root":
            assert p.opts[0] == "--features-root", (where, p.opts)


def test_an_output_is_named_out():
    outs = [(where, p) for where, p in _params()
            if _is_option(p) and (p.name in OUTPUT_NAMES or set(p.opts) & RETIRED - {"--root"})]
    assert len(outs) >= 10
    for where, p in outs:
        assert p.opts[0] == "--out", (where, p.opts)


def test_tracking_uri_params_and_model_are_one_flag_each():
    for where, p in _params():
        if not _is_option(p):
            continue
        if p.name == "tracking_uri":
            assert p.opts == ["--tracking-uri"], (where, p.opts)
        if p.name == "params":
            assert p.opts == ["--params"], (where, p.opts)
        if "--model" in p.opts:
            assert p.opts == ["--model"], (where, p.opts)
            for form in ("models:/NAME/VERSION", "models:/NAME@ALIAS", "bare", "newest version"):
                assert form in p.help, (where, p.help)


def test_retired_spellings_still_parse():
    cmd = dict(_commands_by_path())
    probe = cmd["sarflow downstream probe"]
    ctx = probe.make_context("probe", ["s.zarr", "--root", "/tmp/f", "--out-dir", "/tmp/o"])
    assert (str(ctx.params["features_root"]), str(ctx.params["out_dir"])) == ("/tmp/f", "/tmp/o")
    ctx = cmd["sarflow embed"].make_context("embed", ["s.zarr", "--model", "enc", "--root", "/tmp/g"])
    assert ctx.params["root"] == "/tmp/g"


def _commands_by_path():
    return [(" ".join(path), c) for path, c in _commands()]


# --- the --model rule, through its one resolver

@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real SQLite MLflow registry with model `enc`: versions 1 and 2, @champion on 1."""
    import mlflow

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("enc")
    for i in (1, 2):
        (tmp / f"m{i}").mkdir()
        client.create_model_version("enc", source=str(tmp / f"m{i}"))
    client.set_registered_model_alias("enc", "champion", "1")
    return uri


def test_the_model_rule_parses_three_forms_and_nothing_else():
    from sarflow.errors import InputError
    from sarflow.mlops.registry import ModelSpec, parse_model_ref

    assert parse_model_ref("models:/enc/3") == ModelSpec("enc", version="3")
    assert parse_model_ref("models:/enc@champion") == ModelSpec("enc", alias="champion")
    assert parse_model_ref("enc") == ModelSpec("enc")
    for bad in ("models:/enc", "models:/enc/latest", "runs:/abc/encoder", "models:/@x", "a/b", ""):
        with pytest.raises(InputError, match="not a model reference"):
            parse_model_ref(bad)


def test_the_model_rule_needs_no_registry_for_a_version_or_a_name_at_hand():
    from sarflow.cli.common import embeddings_model, registered_model_uri
    from sarflow.mlops.registry import resolve_model_ref

    nowhere = "http://127.0.0.1:9"  # any lookup would fail: nothing listens there
    assert resolve_model_ref("models:/enc/07", nowhere) == ("enc", "7")
    assert resolve_model_ref("enc", nowhere, newest_in_registry=False) == ("enc", None)
    assert embeddings_model("enc", "3", nowhere) == ("enc", "3")
    assert embeddings_model("models:/enc/3", None, nowhere) == ("enc", "3")
    assert registered_model_uri("models:/enc@champion", nowhere) == "models:/enc@champion"
    assert registered_model_uri("runs:/abc/encoder", nowhere) == "runs:/abc/encoder"


@pytest.mark.slow  # MLflow's SQLite schema migrations: ~10 s alone, more on a busy machine
def test_the_model_rule_resolves_through_the_registry(registry):
    from sarflow.errors import InputError
    from sarflow.mlops.registry import resolve_model_ref

    assert resolve_model_ref("models:/enc/1", registry) == ("enc", "1")
    assert resolve_model_ref("models:/enc@champion", registry) == ("enc", "1")
    assert resolve_model_ref("enc", registry) == ("enc", "2")  # a bare name: its newest version
    assert resolve_model_ref("enc", registry, newest_in_registry=False) == ("enc", None)
    with pytest.raises(InputError, match="no such model"):
        resolve_model_ref("models:/enc@nope", registry)
    with pytest.raises(InputError, match="no version registered"):
        resolve_model_ref("nothing", registry)


@pytest.mark.slow
def test_the_cli_helpers_follow_the_rule(registry):
    from sarflow.cli.common import embeddings_model, registered_model_uri
    from sarflow.errors import InputError

    assert embeddings_model(None, None, registry) == (None, None)
    assert embeddings_model("enc", None, registry) == ("enc", None)  # newest under the features root
    assert embeddings_model("models:/enc@champion", None, registry) == ("enc", "1")
    with pytest.raises(InputError, match="give the version once"):
        embeddings_model("models:/enc/2", "1", registry)
    assert registered_model_uri("enc", registry) == "models:/enc/2"
