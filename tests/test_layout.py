"""The house: every module imports in a fresh interpreter, and the import arrows run one way.

Doors (the CLI, the Kubeflow components and pipelines) -> the product assembled on one machine
(``sarflow.local``) -> stages (``downstream`` -> ``features`` -> ``training``) -> ``mlops``
(tracking, lineage, registry, the Kubeflow runner) -> ``data`` -> the base (errors, progress,
params). A module may import its own room or any room below it, never one above; the library
never imports a door. Imports inside functions count: they are arrows too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sarflow": ROOT / "src" / "sarflow", "components": ROOT / "components", "pipelines": ROOT / "pipelines"}

# lowest first; a module belongs to the longest prefix that names it
ROOMS = [
    ("base", ("sarflow", "sarflow.errors", "sarflow.progress", "sarflow.params", "sarflow.processes")),
    ("data", ("sarflow.data",)),
    ("mlops", ("sarflow.mlops",)),
    ("training", ("sarflow.training",)),
    ("features", ("sarflow.features",)),
    ("downstream", ("sarflow.downstream",)),
    ("local", ("sarflow.local",)),
    ("components", ("components",)),
    ("pipelines", ("pipelines",)),
    ("cli", ("sarflow.cli",)),
]
RANK = {room: i for i, (room, _) in enumerate(ROOMS)}


def room_of(module: str) -> str | None:
    best, best_len = None, -1
    for room, prefixes in ROOMS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = room, len(p)
    return best


def modules() -> dict[str, Path]:
    out = {}
    for top, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [top, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported(path: Path, module: str) -> set[str]:
    """Every module an import statement of `path` names (at any depth, relative ones resolved)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return names


def test_every_module_imports_in_a_fresh_interpreter():
    code = ("import importlib, sys\n"
            f"names = {sorted(modules())!r}\n"
            "for n in names:\n"
            "    importlib.import_module(n)\n"
            "print(len(names))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) == len(modules())


def test_import_arrows_run_one_way():
    known = modules()
    backwards = []
    for module, path in known.items():
        here = room_of(module)
        assert here is not None, f"{module} is in no room of the layout: add it to ROOMS"
        for target in imported(path, module):
            there = room_of(target)
            if there is None or (target not in known and target.rpartition(".")[0] not in known):
                continue  # a third-party module, or a name imported from one of ours (checked via its module)
            if RANK[there] > RANK[here]:
                backwards.append(f"{module} ({here}) imports {target} ({there})")
    assert not backwards, "import arrows running back:\n" + "\n".join(sorted(backwards))


def test_what_component_bodies_import_from_components_imports_in_a_task():
    """Inside a task KFP's runtime (_KFP_RUNTIME=true) makes kfp.dsl expose only its runtime types,
    so a module that defines a component cannot be imported there: every module of `components`
    that a component body imports (components.paths, components.common) must import under it."""
    import os

    wanted = set()
    for path in sorted((ROOT / "components").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("component" in ast.unparse(d) for d in node.decorator_list):
                wanted |= {t for t in imported_in(node) if t.startswith("components.")}
    assert {"components.paths", "components.common"} <= wanted, wanted
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in sorted(wanted))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "_KFP_RUNTIME": "true"})
    assert proc.returncode == 0, f"a component body imports {sorted(wanted)}; in a task:\n{proc.stderr[-2000:]}"


def imported_in(func: ast.FunctionDef) -> set[str]:
    """The modules a function's body imports (`from M import x` -> M)."""
    return {n.module for n in ast.walk(func) if isinstance(n, ast.ImportFrom) and n.module} | \
        {a.name for n in ast.walk(func) if isinstance(n, ast.Import) for a in n.names}


def test_the_arrow_check_sees_an_import_inside_a_function(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from sarflow.cli.main import app\n    return app\n")
    assert "sarflow.cli.main" in imported(bad, "sarflow.data.bad")
    assert RANK[room_of("sarflow.cli.main")] > RANK[room_of("sarflow.data.bad")]


@pytest.mark.parametrize("forbidden", ["sys.path.insert", "sys.path.append", "sys.path[0:0]"])
def test_nothing_edits_sys_path(forbidden):
    for path in [*modules().values(), *(ROOT / "benchmarks").glob("*.py")]:
        assert forbidden not in path.read_text(), f"{path} edits sys.path"


def _distribution(requirement: str) -> str:
    import re

    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_dependencies_are_what_the_code_imports():
    """pyproject.toml declares every third-party package the library, components and pipelines
    import, and nothing they do not (dev/services extras are for tests and services mode)."""
    import tomllib
    from importlib.metadata import packages_distributions

    declared = {_distribution(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    dists = {top: {d.lower().replace("_", "-") for d in found} for top, found in packages_distributions().items()}
    ours = set(PACKAGES)
    missing, used = [], set()
    for module, path in modules().items():
        for target in imported(path, module):
            top = target.split(".")[0]
            if not top or top in ours or top in sys.stdlib_module_names or top == "__future__":
                continue
            if top in ("psycopg2", "redis"):  # services mode only: the `services` extra, imported on use
                continue
            providers = dists.get(top, set())  # a namespace (kfp, pystac, mlflow) has several
            if not providers & declared:
                missing.append(f"{module} imports {top} ({sorted(providers) or 'no installed distribution'})")
            used |= providers & declared
    # declared for what they add to a package that is imported: kfp-kubernetes is kfp.kubernetes,
    # dvc and dvc-s3 are DVC and its S3 remote (run as `python -m dvc`)
    used_without_import = {"kfp-kubernetes", "dvc-s3", "dvc"}
    unused = sorted(declared - used - used_without_import)
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"


def test_every_component_is_reachable_from_the_components_package():
    """`components.<name>` resolves every KFP component defined in components/*.py (the lazy registry
    in components/__init__.py lists them all), and nothing else is listed."""
    import ast

    import components

    defined = set()
    for path in (ROOT / "components").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(
                    "component" in ast.unparse(d) for d in node.decorator_list):
                defined.add(node.name)
    assert defined and defined == set(components._MODULES), defined ^ set(components._MODULES)
    for name in defined:
        assert getattr(components, name).name, name
