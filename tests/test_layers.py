"""The layout is the pipeline: `bench/` imports only downward, never its plugins, and has no
import circle (read from the source with `ast`; nothing is imported).

Layers, lowest first (a module may import its own layer and the ones below it):

    0 core, errors       plumbing and the errors every layer raises
    1 data, stats, results  sentences, statistics, the results row
    2 models             model -> HookedTransformer
    3 activations        activations at one hook, cached
    4 fit                the method contract and what a fit produces
    5 judges             text -> scores (never tasks)
    6 tasks              the task contract and the task mechanics (steering, detection, ...)
    7 report             finished results -> report.md, parquet, plots, index.html
    8 job                one job, from config to metrics.parquet
    9 cli                the commands and their Hydra glue
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {
    "core": 0,
    "errors": 0,
    "data": 1,
    "stats": 1,
    "results": 1,
    "conf": 1,
    "models": 2,
    "activations": 3,
    "fit": 4,
    "judges": 5,
    "tasks": 6,
    "report": 7,
    "job": 8,
    "cli": 9,
    "__main__": 9,
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """bench module -> the modules it imports (any import statement, lazy ones too)."""
    graph: dict[str, set[str]] = {}
    for path in (REPO / "bench").rglob("*.py"):
        name = _module(path)
        found = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0


def test_bench_never_imports_its_plugins():
    bad = {
        m: sorted(i for i in imports if i.startswith("featbench."))
        for m, imports in _imports().items()
    }
    assert not {m: i for m, i in bad.items() if i}


def test_judges_never_import_tasks():
    for module, imports in _imports().items():
        if module.startswith("bench.judges"):
            assert not [i for i in imports if i.startswith(("bench.tasks", "featbench.tasks"))]


def test_every_import_points_to_the_same_layer_or_a_lower_one():
    graph = _imports()
    upward = []
    for module, imports in graph.items():
        for target in imports:
            both_bench = target.startswith("bench.") and module.startswith("bench.")
            if target in graph and both_bench and _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward


def test_no_import_circle():
    graph = {m: {i for i in imports if i in _imports()} for m, imports in _imports().items()}
    # a package imports its own submodules (its __init__ re-exports): not a circle
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles


def test_the_contracts_live_in_the_core_and_the_plugin_api_re_exports_them():
    import bench.activations.set
    import bench.fit.features
    import bench.fit.method
    import bench.tasks.base
    import featbench.methods.base as methods
    import featbench.tasks.base as tasks

    assert methods.ActivationSet is bench.activations.set.ActivationSet
    assert methods.Features is bench.fit.features.Features
    assert methods.Method is bench.fit.method.Method
    assert (tasks.Task, tasks.TaskData, tasks.Headline) == (
        bench.tasks.base.Task,
        bench.tasks.base.TaskData,
        bench.tasks.base.Headline,
    )


def _library() -> list[Path]:
    return [p for folder in ("bench", "methods", "tasks") for p in (REPO / folder).rglob("*.py")]


def test_hook_names_are_built_and_parsed_in_one_place():
    """`bench/core/hooks.py` builds and parses hook names; nothing else spells them."""
    spelled = re.compile(r"""f["']blocks\.|endswith\(["']mlp\.|\.split\(["']\.["']\)\[1\]""")
    found = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _library()
        if p.name != "hooks.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if spelled.search(line)
    ]
    assert not found


def test_few_fmt_skip_markers_and_short_files():
    """Formatting is ruff's; a marker stays only on a table that reads better aligned, and a
    library file is split by responsibility before it grows long."""
    markers = sum(p.read_text().count("# fmt: skip") for p in _library())
    assert markers <= 30, markers
    long = {
        str(p.relative_to(REPO)): n
        for p in _library()
        if (n := len(p.read_text().splitlines())) > 410
    }
    assert not long
