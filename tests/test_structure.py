"""The package's layout, checked: no import cycle, a torch-free pytest process, short modules,
and a marker help line that names every keyword the marker accepts.

Imports are read from the source with ``ast``, imports inside functions included: a cycle that
only a function-level import closes still couples the two modules. An import under
``if TYPE_CHECKING:`` never runs and does not count.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import pytest

import pytest_vram
from pytest_vram.errors import SpecError
from pytest_vram.marker import KEYWORDS, MARKER, parse_marker

PACKAGE_DIR: Final = Path(pytest_vram.__file__).parent
MAX_LINES: Final = 400

# Cycles another change is removing; each entry is the set of modules in one cycle. Empty it
# when that change lands (test_allowlists_are_current fails once an entry is no longer so).
CYCLES_BEING_FIXED: Final[tuple[frozenset[str], ...]] = ()
# Modules over MAX_LINES that another change is splitting, as paths inside the package.
LONG_MODULES_BEING_SPLIT: Final[tuple[str, ...]] = ()

# What the pytest process imports: hooks, options, the marker, the fixture and the run state,
# verdicts, baselines and reports, and what those read at collection. None may import torch;
# torch is imported in the worker's server, whose children are forks of it.
PYTEST_PROCESS_MODULES: Final = (
    "pytest_vram.plugin",
    "pytest_vram.options",
    "pytest_vram.marker",
    "pytest_vram.fixture",
    "pytest_vram.session",
    "pytest_vram.shared_results",
    "pytest_vram.verdict",
    "pytest_vram.baselines",
    "pytest_vram.files",
    "pytest_vram.report",
    "pytest_vram.invariants",
    "pytest_vram.spec",
    "pytest_vram.result",
    "pytest_vram.errors",
    "pytest_vram.units",
    "pytest_vram.zoo",
    "pytest_vram.methods",
    "pytest_vram.zero.config",
    "pytest_vram.meters",
    "pytest_vram.meters.base",
    "pytest_vram.cli",
    "pytest_vram.processes",
    "pytest_vram.cuda_visible",
    "pytest_vram.gpus",
    "pytest_vram.model_configs",
    "pytest_vram.meters.limits",
    "pytest_vram.zero.user_config",
    "pytest_vram.timeline",
    "pytest_vram.html_report",
    "pytest_vram.html_charts",
)

# An import edge: (importing module, imported module) -> where, as "path:line".
Edges = dict[tuple[str, str], str]


def module_names(package_dir: Path) -> dict[str, Path]:
    """Every module of the package under ``package_dir``, dotted name -> file."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_time_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node`` that can run: all but the body of TYPE_CHECKING."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: list[ast.AST] = list(node.orelse)
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        else:
            yield from _run_time_imports(child)


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The dotted names an import statement asks for: ``from pkg import name`` asks for
    ``pkg.name``, which is a module only when ``name`` is a submodule (checked by the caller)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(
            [*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])]
        )
    else:
        base = node.module or ""
    yield base
    yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")


def import_graph(package_dir: Path) -> Edges:
    """Import edges between the package's own modules, each with the first line that makes it.

    ``from pkg import sub`` where ``sub`` is a submodule is an edge to ``pkg.sub``; ``from pkg
    import name`` of anything else is an edge to ``pkg`` (its ``__init__`` defines the name).
    The parent packages Python imports first are not edges: every submodule would otherwise
    be in a cycle with a package ``__init__`` that imports it."""
    modules = module_names(package_dir)
    edges: Edges = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(package_dir.parent).as_posix()
        for node in _run_time_imports(tree):
            names = list(_imported(module, path.name == "__init__.py", node))
            if isinstance(node, ast.ImportFrom):
                base, members = names[0], names[1:]
                subs = [m for m in members if m in modules]
                targets = subs + ([base] if len(subs) < len(members) or not members else [])
            else:
                targets = names
            for target in targets:
                if target in modules and target != module:
                    edges.setdefault((module, target), f"{where}:{node.lineno}")
    return edges


def cycles(edges: Edges) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, list[str]] = {}
    for source, target in sorted(edges):
        graph.setdefault(source, []).append(target)
        graph.setdefault(target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def describe_cycle(component: frozenset[str], edges: Edges) -> str:
    """One closed path through ``component``, each step with the line that imports."""
    start = min(component)
    paths: dict[str, list[str]] = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for (source, target), _ in sorted(edges.items()):
            if source != node or target not in component:
                continue
            if target == start:
                path = [*paths[node], start]
                return (
                    " -> ".join(
                        f"{a} ({edges[a, b]})" for a, b in zip(path, path[1:], strict=False)
                    )
                    + f" -> {start}"
                )
            if target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    return ", ".join(sorted(component))


def long_modules(package_dir: Path) -> dict[str, int]:
    """Modules over MAX_LINES, path inside the package -> lines."""
    counts = {
        path.relative_to(package_dir).as_posix(): len(path.read_text().splitlines())
        for path in package_dir.rglob("*.py")
    }
    return {name: n for name, n in sorted(counts.items()) if n > MAX_LINES}


# Imports the given modules in a fresh interpreter and prints, as JSON, the package's source
# lines on the stack when torch was first asked for (null: never).
_TORCH_PROBE: Final = """
import importlib, json, sys, traceback

class Probe:
    stack = None

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and Probe.stack is None:
            Probe.stack = [
                f"pytest_vram{f.filename.rsplit('pytest_vram', 1)[-1]}:{f.lineno}: {f.line}"
                for f in traceback.extract_stack()
                if "pytest_vram" in f.filename
            ]
        return None

sys.meta_path.insert(0, Probe())
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"stack": Probe.stack, "loaded": "torch" in sys.modules}))
"""


def torch_import(modules: tuple[str, ...]) -> tuple[bool, list[str]]:
    """Whether importing ``modules`` loads torch, and the package's lines that first asked."""
    run = subprocess.run(
        [sys.executable, "-c", _TORCH_PROBE, *modules],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    probe = json.loads(run.stdout.splitlines()[-1])
    return bool(probe["loaded"]), list(probe["stack"] or [])


# The tests


def test_no_import_cycle() -> None:
    edges = import_graph(PACKAGE_DIR)
    found = [c for c in cycles(edges) if c not in CYCLES_BEING_FIXED]
    assert not found, (
        "import cycles among pytest_vram's modules (imports inside functions count):\n"
        + "\n".join(f"  {describe_cycle(c, edges)}" for c in found)
    )


def test_pytest_process_is_torch_free() -> None:
    loaded, stack = torch_import(PYTEST_PROCESS_MODULES)
    assert not loaded, (
        "the pytest process imported torch; move the import into the function that runs in the "
        "worker child. The first import, innermost last:\n" + "\n".join(f"  {s}" for s in stack)
    )


def test_torch_probe_sees_a_worker_module() -> None:
    """The probe above can fail: step.py, which runs in the worker child, imports torch."""
    loaded, stack = torch_import(("pytest_vram.step",))
    assert loaded
    assert any(line.startswith("pytest_vram/step.py:") for line in stack), stack


def test_no_module_over_max_lines() -> None:
    over = {
        n: lines
        for n, lines in long_modules(PACKAGE_DIR).items()
        if n not in LONG_MODULES_BEING_SPLIT
    }
    assert not over, f"modules over {MAX_LINES} lines; split them by job:\n" + "\n".join(
        f"  pytest_vram/{name}: {lines} lines" for name, lines in over.items()
    )


def test_cycles_being_fixed_are_still_cycles() -> None:
    """An entry that no longer applies is taken off, so the list only ever shrinks."""
    current = cycles(import_graph(PACKAGE_DIR))
    fixed = [sorted(c) for c in CYCLES_BEING_FIXED if c not in current]
    assert not fixed, f"no longer a cycle; remove from CYCLES_BEING_FIXED: {fixed}"


def test_long_modules_being_split_are_still_long() -> None:
    """An entry that no longer applies is taken off, so the list only ever shrinks."""
    long = long_modules(PACKAGE_DIR)
    split = [name for name in LONG_MODULES_BEING_SPLIT if name not in long]
    assert not split, f"{MAX_LINES} lines or fewer; remove from LONG_MODULES_BEING_SPLIT: {split}"


def _write_package(root: Path, files: Mapping[str, str]) -> Path:
    for name, source in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root / "pkg"


def test_import_graph_reads_imports_as_python_runs_them(tmp_path: Path) -> None:
    package = _write_package(
        tmp_path,
        {
            "__init__.py": "NAME = 1\n",
            "a.py": "def f():\n    from pkg import b\n",  # a submodule: an edge to pkg.b
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
            "else:\n    import pkg.sub.d\n",
            "c.py": "from pkg import NAME\nfrom . import a\n",  # a name of pkg: an edge to pkg
            "sub/__init__.py": "",
            "sub/d.py": "from ..a import f\n",  # relative, from a subpackage
        },
    )
    edges = import_graph(package)
    assert sorted(edges) == [
        ("pkg.a", "pkg.b"),
        ("pkg.b", "pkg.sub.d"),
        ("pkg.c", "pkg"),
        ("pkg.c", "pkg.a"),
        ("pkg.sub.d", "pkg.a"),
    ]
    assert edges["pkg.a", "pkg.b"] == "pkg/a.py:2"
    [cycle] = cycles(edges)
    assert cycle == {"pkg.a", "pkg.b", "pkg.sub.d"}
    assert describe_cycle(cycle, edges) == (
        "pkg.a (pkg/a.py:2) -> pkg.b (pkg/b.py:5) -> pkg.sub.d (pkg/sub/d.py:1) -> pkg.a"
    )


def _help_line(pytester: pytest.Pytester) -> str:
    result = pytester.runpytest("--markers")
    lines = [line for line in result.outlines if line.startswith(f"@pytest.mark.{MARKER}(")]
    assert len(lines) == 1, "\n".join(result.outlines)
    return lines[0]


def _unlisted(line: str, names: tuple[str, ...]) -> list[str]:
    """Names the help line does not list. A listed name stands before ',', ')', '=', ':' or the
    end of the line, so a word of the prose ("the device's memory") does not count."""
    return [n for n in names if not re.search(rf"(?<![\w']){re.escape(n)}(?=[,)=:]|$)", line)]


def test_marker_help_lists_every_keyword(pytester: pytest.Pytester) -> None:
    # What the marker accepts, as its own error for an unknown keyword lists it.
    with pytest.raises(SpecError, match="unknown keyword") as raised:
        parse_marker((), {"gb": 1, "no_such_keyword": 1})
    accepted = tuple(str(raised.value).rsplit("known: ", 1)[1].split(", "))
    assert accepted == KEYWORDS
    line = _help_line(pytester)
    assert not _unlisted(line, accepted), f"keywords missing from `pytest --markers`: {line}"


def test_marker_help_check_can_fail() -> None:
    stale = (
        "@pytest.mark.vram_budget(gb, tolerance=None, leak_tolerance=0, **step): fail when the "
        "peak memory exceeds gb GiB on the device's memory. step: model, seq"
    )
    assert _unlisted(stale, ("gb", "tolerance", "capacity_gb", "device", "seq")) == [
        "capacity_gb",
        "device",
    ]


@pytest.mark.parametrize("name", KEYWORDS)
def test_every_listed_keyword_is_accepted(name: str) -> None:
    """Each keyword of the help line reaches its own check (a bad value), not "unknown"."""
    kwargs = {"gb": 1} if name == "gb" else {"gb": 1, name: object()}
    try:
        parse_marker((), kwargs)
    except SpecError as exc:
        assert "unknown keyword" not in str(exc)
