"""The four packages layer without a cycle: ``cli`` → ``trainers`` → ``consumers`` → ``pipeline``.

A package may import those to its right, never those to its left: the pure core
(``pipeline``) runs without Kafka or the trainer, the daemons (``consumers``) without the
retraining job, and only the command line wires everything together. Every ``import`` is
checked, those inside functions (lazy imports) included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("cli", "trainers", "consumers", "pipeline")  # each may import only those after it

Edge = tuple[str, str, str, int, str]  # importing package, imported package, file, line, module


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``source``, at any depth (functions, ``if``, ``try``),
    and of ``importlib.import_module`` with a literal name."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))  # importlib.import_module("package.module")
    return found


def edges(root: Path = ROOT) -> list[Edge]:
    """Every import from one of the four packages into another."""
    out: list[Edge] = []
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imported_modules(path.read_text(encoding="utf-8")):
                target = module.split(".")[0]
                if target in LAYERS and target != package:
                    out.append((package, target, str(path.relative_to(root)), line, module))
    return out


def against_the_order(found: list[Edge]) -> list[Edge]:
    return [e for e in found if LAYERS.index(e[1]) < LAYERS.index(e[0])]


def graph(found: list[Edge]) -> dict[tuple[str, str], int]:
    """Imports per (importing package, imported package)."""
    counts: dict[tuple[str, str], int] = {}
    for source, target, *_ in found:
        counts[source, target] = counts.get((source, target), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (LAYERS.index(kv[0][0]), LAYERS.index(kv[0][1]))))


def test_no_import_goes_against_the_layers(capsys: pytest.CaptureFixture[str]) -> None:
    found = edges()
    with capsys.disabled():  # the graph, for whoever runs this with -s or reads the log
        for (source, target), n in graph(found).items():
            print(f"  {source} -> {target}: {n} imports")
    bad = [f"{file}:{line} ({source} imports {module})" for source, _, file, line, module in against_the_order(found)]
    assert not bad, "imports against cli -> trainers -> consumers -> pipeline:\n" + "\n".join(bad)


def test_the_scan_sees_every_package_and_the_expected_arrows() -> None:
    counts = graph(edges())
    # the arrows the code is built on: if the scan stopped finding them, it would pass vacuously
    for arrow in [("cli", "trainers"), ("cli", "consumers"), ("cli", "pipeline"), ("trainers", "consumers"),
                  ("trainers", "pipeline"), ("consumers", "pipeline")]:
        assert counts.get(arrow, 0) > 0, arrow


def test_a_lazy_import_inside_a_function_is_an_arrow_too(tmp_path: Path) -> None:
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "consumers" / "late.py").write_text(
        "import json\n\n\ndef run():\n    if True:\n        from trainers.train import run_training\n"
        "    return run_training\n", encoding="utf-8")
    (tmp_path / "pipeline" / "core.py").write_text("try:\n    import consumers.kafka_clients\nexcept ImportError:\n"
                                                   "    pass\nfrom . import grid\n\n\ndef f():\n    return importlib.import_module('trainers.gate')\n",
                                                   encoding="utf-8")
    (tmp_path / "cli" / "ok.py").write_text("from pipeline import storage\nimport trainers.train as t\n", encoding="utf-8")
    bad = against_the_order(edges(tmp_path))
    assert [(s, t, f, line) for s, t, f, line, _ in bad] == [
        ("consumers", "trainers", "consumers/late.py", 6), ("pipeline", "consumers", "pipeline/core.py", 2),
        ("pipeline", "trainers", "pipeline/core.py", 9)]
