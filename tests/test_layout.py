"""The house a reader walks: no file of the package or the benchmarks over 450 lines,
imports that run one way (no module imports one that imports it back, directly or through
others), and one evaluation that the tuner and the benchmarks import, never the reverse."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mergekit_corespace"
BENCH = REPO / "bench"
MOST_LINES = 450


def _python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports anywhere (functions included), but
    not under ``if TYPE_CHECKING:``, which never runs. ``from package import name`` counts
    as importing ``package.name`` when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found.update(submodules if len(submodules) == len(node.names) else {base})
            found.update(submodules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found & known


def _package_graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in _python_files(PACKAGE)}
    modules = set(files)
    return {name: _runtime_imports(path, modules) - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, as the modules along it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (found := walk(target)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_no_file_of_the_package_or_the_benchmarks_exceeds_450_lines():
    lengths = {
        str(path.relative_to(REPO)): len(path.read_text(encoding="utf-8").splitlines())
        for folder in (PACKAGE, BENCH)
        for path in _python_files(folder)
    }
    assert len(lengths) > 40  # the walk found the files
    assert {path: n for path, n in lengths.items() if n > MOST_LINES} == {}


def test_the_package_imports_run_one_way():
    graph = _package_graph()
    assert "mergekit_corespace.tune.session" in graph["mergekit_corespace.tune.run"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle_through_others():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_evaluation_imports_neither_the_tuner_nor_the_benchmarks():
    graph = _package_graph()
    evaluation = "mergekit_corespace.evaluate"
    reached, todo = set(), [evaluation]
    while todo:  # everything the evaluation imports, directly or through others
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert not any(name.startswith("mergekit_corespace.tune") for name in reached), reached
    # the benchmarks' modules are imported by file name from their folders (report, stats…)
    bench_modules = {path.stem for path in _python_files(BENCH)} | {"bench"}
    for path in _python_files(PACKAGE):
        imported = {name.split(".")[0] for name in _imported_names(path.read_text("utf-8"))}
        assert not imported & bench_modules, (path, imported & bench_modules)
    users = [
        path
        for folder in (PACKAGE / "tune", BENCH)
        for path in _python_files(folder)
        if evaluation in _runtime_imports(path, {evaluation})
    ]
    assert any(path.parent.name == "tune" for path in users)  # the tuner scores with it
    assert any(BENCH in path.parents for path in users)  # and so do the benchmarks


def _imported_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "name",
    ["tune", "TuneResult", "Row", "PointTimes", "parse_grid", "grid_points", "point_recipe",
     "lambda_groups", "at_grid_edge", "label", "DEFAULT_GRID", "GRID_KEYS", "SPACES", "STUDY_FILE",
     "SEARCHES", "Range", "FORMAT"],
)  # fmt: skip
def test_the_tuners_public_names_import_as_before(name):
    import mergekit_corespace.tune as package

    assert getattr(package, name) is not None
    assert name in package.__all__


def test_tune_from_the_package_runs_the_tuner(tmp_path):
    """``from mergekit_corespace import tune`` gives the package (Python imports the
    subpackage of that name); calling it must run the tuner, as the README shows."""
    from mergekit_corespace import tune
    from mergekit_corespace.errors import CoreSpaceError

    missing = tmp_path / "missing.yml"
    with pytest.raises(CoreSpaceError, match=rf"^{missing}: unreadable \(No such file"):
        tune(missing, tmp_path)
    assert sys.modules["mergekit_corespace.tune"] is tune
