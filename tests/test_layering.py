"""The layering rule, read from the imports (every import, also those inside functions).

Layers, bottom first; a module may import its own layer and the layers below it, never one
above (docs/architecture.md explains each):

0. foundation: errors, atomic output, I/O spec, output naming, console
1. layers: the ODConv layer forms, their spec, the pure fusion maths, int8 weight storage
2. core: detection, models, weights, checkpoints, complexity, the auto rules
3. runners: every runtime's runner (the MIL executor among them), and the devices they run on
4. conversion: conversion, the run's conversions, static twins, model sources
5. validation: comparison, inputs, the validation loop
6. export: exporters, the format table, artifact validation
7. benchmark: runtime_bench
8. app shell: pipeline, CLI, the package's re-exports

Only the app shell imports from ``odconv_deploy`` into ``export`` or ``runtime_bench``.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("odconv_deploy", "export", "runtime_bench")

#: (module prefix, layer); the longest matching prefix decides.
LAYERS = [
    ("odconv_deploy.errors", 0), ("odconv_deploy._atomic", 0), ("odconv_deploy.io_spec", 0),
    ("odconv_deploy.outputs", 0), ("odconv_deploy.console", 0), ("odconv_deploy._version", 0),
    ("odconv_deploy.status", 0), ("odconv_deploy.tolerance", 0),
    ("odconv_deploy.tables", 0),
    ("odconv_deploy.layers", 1), ("odconv_deploy.fusion", 1), ("odconv_deploy.quantize", 1),
    ("odconv_deploy.detect", 2), ("odconv_deploy.models", 2), ("odconv_deploy.synthetic", 2),
    ("odconv_deploy.checkpoint", 2), ("odconv_deploy.complexity", 2),
    ("odconv_deploy.strategy_choice", 2), ("odconv_deploy.digits", 2),
    ("odconv_deploy.calibration", 2),
    ("odconv_deploy.runners", 3), ("odconv_deploy.devices", 3),
    ("odconv_deploy.reparameterize", 4), ("odconv_deploy.conversions", 4),
    ("odconv_deploy.static_twin", 4), ("odconv_deploy.model_source", 4),
    ("odconv_deploy.validation", 5),
    ("export", 6),
    ("runtime_bench", 7),
    ("odconv_deploy.pipeline", 8), ("odconv_deploy.cli", 8), ("odconv_deploy", 8),
]
APP_SHELL = 8


def layer_of(module: str) -> int | None:
    """The layer of a project module, or None for third-party modules."""
    matches = [(len(prefix), layer) for prefix, layer in LAYERS
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            # ``from pkg import sub`` is judged by ``pkg.sub``; ``from pkg.mod import x`` by mod
            names = ([f"{node.module}.{alias.name}" for alias in node.names]
                     if node.module in PACKAGES else [node.module])
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return found


SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_module_has_a_layer():
    assert [module_name(p) for p in SOURCES if layer_of(module_name(p)) is None] == []


def upward_imports(path: Path, source: str) -> list[str]:
    """Imports in ``path`` (the module ``source``) of a layer above its own."""
    own = layer_of(source)
    upward = []
    for line, target in project_imports(path):
        layer = layer_of(target)
        if layer is not None and layer > own:
            upward.append(f"{path.name}:{line} imports {target} (layer {layer} > {own})")
    return upward


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_upward(path):
    assert upward_imports(path, module_name(path)) == []


def test_the_rule_catches_upward_imports_also_inside_functions(tmp_path):
    module = tmp_path / "fake.py"
    module.write_text("import torch\nfrom odconv_deploy.errors import ODConvDeployError\n"
                      "def f():\n    from export.formats import FORMATS\n"
                      "    from odconv_deploy import pipeline\n")
    assert upward_imports(module, "odconv_deploy.validation.fake") == [
        "fake.py:4 imports export.formats (layer 6 > 5)",
        "fake.py:5 imports odconv_deploy.pipeline (layer 8 > 5)"]
