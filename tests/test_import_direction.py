"""Imports go only downwards (docs/architecture.md, "Imports go only downwards"): the package's
import graph, read from the source files with ``ast``, has no import from a lower layer to a higher
one and no cycle.

Every ``import`` and ``from ... import`` of a sparsedet module counts, wherever it stands: at module
level, inside a function (a lazy import still runs, later) and under ``if TYPE_CHECKING`` (a type
checker follows it). An import names the module it names: ``from .coco import load_image`` depends
on ``data.coco``, ``from . import distributed`` on ``engine.distributed``, ``from . import NAME`` (not
a module) on the package's ``__init__``. The parent packages Python runs first are not counted: the
root ``sparsedet/__init__`` imports the facade, and every module would depend on it.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
ROOT = "sparsedet"

# The layers, lowest first; a module may import from its own layer and the ones above it in this
# list, never from a later one. An entry names a module or a package and everything in it ("X.*":
# the modules in package X, not its __init__); a module takes its most specific entry. Part of
# tools/ sits below api.py: the files a Detector reads and writes (downloads, converted checkpoints,
# ONNX); the rest of tools/ is built on it, convert's __init__ too (its convert() returns a
# Detector). resolve.py names a model; api.py, above it, builds one (Detector.from_pretrained
# resolves its name).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "version", "plugins"),
    ("jsonfile", "filewrite", "stage_kinds"),
    ("config",),
    ("presets",),
    ("ops",),
    ("nn",),
    ("data",),
    ("losses",),
    ("models",),
    ("engine",),
    ("tools.download", "tools.imagenet", "tools.convert.*", "tools.zoo", "tools.export", "tools.runtimes",
     "tools.onnx_model"),
    ("resolve",),
    ("api",),
    ("tools",),
    ("serve",),
    ("cli_parser", "cli_export", "cli_serve"),
    ("cli",),
    ("__main__", ""),  # "": the root package's __init__ (its public names)
]


def module_names(src: Path = SRC) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every module under ``src/sparsedet``."""
    out = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def imports_of(source: str, module: str, package: bool, known: set[str],
               eager_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported sparsedet module) for every import statement in ``source``; ``eager_only``:
    those that run when the module is imported (not inside a function)."""
    here = module if package else module.rpartition(".")[0]
    found = []
    for node in _statements(ast.parse(source), eager_only):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # a name that is a submodule is an import of that module
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known else target))
    return sorted((line, name) for line, name in found if name == ROOT or name.startswith(ROOT + "."))


def _statements(tree: ast.AST, skip_functions: bool):
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if not (skip_functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            stack.extend(ast.iter_child_nodes(node))


def rank(module: str) -> int | None:
    """The layer of ``module`` (its most specific entry), or None when no entry names it."""
    short = module.removeprefix(ROOT).removeprefix(".")
    best, depth = None, -1
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if entry == short and short == "":
                return index
            inside = entry.removesuffix(".*")
            matches = short.startswith(inside + ".") or (short == entry and inside == entry)
            if entry and matches and entry.count(".") > depth:
                best, depth = index, entry.count(".")
    return best


def import_graph(sources: dict[str, tuple[str, Path | str, bool]]) -> dict[str, list[tuple[int, str]]]:
    """module -> its (line, imported module) list; ``sources``: module -> (text, file, is package)."""
    known = set(sources)
    return {name: sorted(set(imports_of(text, name, package, known)))
            for name, (text, _, package) in sources.items()}


def upward_imports(graph: dict[str, list[tuple[int, str]]], files: dict[str, Path | str]) -> list[str]:
    """One line per import from a lower layer to a higher one."""
    problems = []
    for module, edges in graph.items():
        for line, target in edges:
            low, high = rank(module), rank(target)
            if low is not None and high is not None and high > low:
                problems.append(f"{files[module]}:{line}: {module} (layer {low}) imports {target} (layer {high})")
    return problems


def cycles(graph: dict[str, list[tuple[int, str]]]) -> list[tuple[list[str], list[str]]]:
    """The strongly connected groups of more than one module (or a module importing itself), each
    with a closed path through it: (group, [a, b, ..., a])."""
    edges = {m: sorted({t for _, t in es if t in graph}) for m, es in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges[v]:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [(group, _closed_path(group, edges)) for group in groups]


def _closed_path(group: list[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest cycle through the group's first module, found breadth-first inside the group."""
    start, members = group[0], set(group)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in members and w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    return group


def describe_cycle(cycle: tuple[list[str], list[str]], graph: dict[str, list[tuple[int, str]]],
                   files: dict[str, Path | str]) -> str:
    """One line: each import of the path with its file and line, then the group's other modules."""
    group, path = cycle
    steps = []
    for a, b in zip(path, path[1:]):
        line = min(line for line, t in graph[a] if t == b)
        steps.append(f"{a} -> {b} ({files[a]}:{line})")
    others = sorted(set(group) - set(path))
    return "cycle: " + "; ".join(steps) + (f" (also in the cycle: {', '.join(others)})" if others else "")


def parent_imports(sources: dict[str, tuple[str, Path | str, bool]]) -> list[str]:
    """Importing a module first runs its parent packages' __init__ (the root's aside: it imports the
    facade): one line per module-level import there from a layer above the module's."""
    known, problems = set(sources), []
    for module in sources:
        parts = module.split(".")
        for parent in (".".join(parts[:i]) for i in range(2, len(parts))):
            if parent not in sources or rank(module) is None:
                continue
            text, file, _ = sources[parent]
            for line, target in imports_of(text, parent, True, known, eager_only=True):
                if rank(target) is not None and rank(target) > rank(module):
                    problems.append(f"{file}:{line}: importing {module} (layer {rank(module)}) runs {parent}, "
                                    f"which imports {target} (layer {rank(target)})")
    return problems


def check(sources: dict[str, tuple[str, Path | str, bool]]) -> list[str]:
    """Every upward import and every cycle, one line each; empty when the rule holds."""
    graph = import_graph(sources)
    files = {name: file for name, (_, file, _) in sources.items()}
    return (upward_imports(graph, files) + parent_imports(sources)
            + [describe_cycle(c, graph, files) for c in cycles(graph)])


@functools.cache
def package_sources() -> dict[str, tuple[str, Path, bool]]:
    """The package as ``check`` reads it: module -> (text, file relative to the repository, is package)."""
    return {name: (path.read_text(encoding="utf-8"), path.relative_to(SRC.parent), package)
            for name, (path, package) in module_names().items()}


def test_every_module_has_a_layer():
    unranked = [name for name in package_sources() if rank(name) is None]
    assert not unranked, f"give these modules a layer in LAYERS (and docs/architecture.md): {unranked}"


def test_imports_go_only_downwards():
    sources = package_sources()
    problems = upward_imports(import_graph(sources), {name: file for name, (_, file, _) in sources.items()})
    assert not problems, "imports from a lower layer to a higher one:\n" + "\n".join(problems)


def test_a_package_runs_nothing_above_its_modules():
    problems = parent_imports(package_sources())
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    sources = package_sources()
    graph = import_graph(sources)
    files = {name: file for name, (_, file, _) in sources.items()}
    found = [describe_cycle(c, graph, files) for c in cycles(graph)]
    assert not found, "\n".join(found)


def test_the_checker_catches_an_upward_import_and_a_cycle():
    fake = {  # a lazy import, one under TYPE_CHECKING and two modules of one layer importing each other
        "sparsedet.ops.fake": ("import torch\n\ndef f():\n    from ..models import detector\n", "ops/fake.py", False),
        "sparsedet.models.detector": ("from ..ops.fake import f\n", "models/detector.py", False),
        "sparsedet.nn.fake": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sparsedet.data.a\n",
                              "nn/fake.py", False),
        "sparsedet.data": ("", "data/__init__.py", True),
        "sparsedet.data.a": ("from . import b\n", "data/a.py", False),
        "sparsedet.data.b": ("from .a import x\n", "data/b.py", False),
    }
    problems = check(fake)
    assert "ops/fake.py:4: sparsedet.ops.fake (layer 4) imports sparsedet.models.detector (layer 8)" in problems
    assert "nn/fake.py:3: sparsedet.nn.fake (layer 5) imports sparsedet.data.a (layer 6)" in problems
    assert ("cycle: sparsedet.data.a -> sparsedet.data.b (data/a.py:1); sparsedet.data.b -> sparsedet.data.a "
            "(data/b.py:1)") in problems
    assert any(p.startswith("cycle: sparsedet.models.detector -> sparsedet.ops.fake") for p in problems)
    assert len(problems) == 4
    del fake["sparsedet.ops.fake"], fake["sparsedet.nn.fake"], fake["sparsedet.data.b"]
    assert check(fake) == []  # downward and sideways imports pass


def test_the_checker_catches_a_lazy_upward_import_added_to_the_package():
    sources = dict(package_sources())
    text, file, package = sources["sparsedet.ops.boxes"]
    sources["sparsedet.ops.boxes"] = (text + "\n\ndef late():\n    from ..api import Detector\n", file, package)
    line = len(text.splitlines()) + 4
    problems = check(sources)
    assert problems[0] == (f"{file}:{line}: sparsedet.ops.boxes (layer {rank('sparsedet.ops')}) imports sparsedet.api "
                           f"(layer {rank('sparsedet.api')})")
    assert any(p.startswith("cycle: ") and "sparsedet.ops.boxes" in p for p in problems[1:])


def test_the_checker_catches_a_package_init_that_imports_above_its_modules():
    fake = {"sparsedet.tools.convert": ("from ...api import Detector\n", "tools/convert/__init__.py", True),
            "sparsedet.tools.convert.sources": ("def f():\n    from ...api import Detector\n",
                                                "tools/convert/sources.py", False)}
    low, high = rank("sparsedet.tools.convert.sources"), rank("sparsedet.api")
    assert check(fake) == [
        f"tools/convert/sources.py:2: sparsedet.tools.convert.sources (layer {low}) imports sparsedet.api "
        f"(layer {high})",
        f"tools/convert/__init__.py:1: importing sparsedet.tools.convert.sources (layer {low}) runs "
        f"sparsedet.tools.convert, which imports sparsedet.api (layer {high})"]
    fake["sparsedet.tools.convert"] = ("def convert():\n    from ...api import Detector\n", "", True)
    del fake["sparsedet.tools.convert.sources"]
    assert check(fake) == []  # a lazy import in the __init__ runs only when called


def test_relative_imports_resolve_to_the_module_they_name():
    known = {"sparsedet.engine", "sparsedet.engine.distributed", "sparsedet.engine.hooks", "sparsedet"}
    source = "from . import distributed\nfrom .. import __version__\nfrom ..config import Config\nimport os\n"
    assert imports_of(source, "sparsedet.engine.hooks", False, known) == [
        (1, "sparsedet.engine.distributed"), (2, "sparsedet"), (3, "sparsedet.config")]
    assert imports_of("from . import NAME\n", "sparsedet.engine", True, known) == [(1, "sparsedet.engine")]


def test_architecture_md_lists_the_same_layers():
    """The table in docs/architecture.md ("| layer | modules |") is this one, in the same order."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", text, re.M)
    documented = [tuple(sorted(re.findall(r"`([^`]*)`", names))) for _, names in rows]
    expected = [tuple(sorted("sparsedet" if e == "" else e for e in entries)) for entries in LAYERS]
    assert [int(n) for n, _ in rows] == list(range(len(LAYERS)))
    assert documented == expected
