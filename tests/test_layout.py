"""The package's layers point one way: model and kernels <- engine <- runtime <- api <- tui/cli,
and no module imports itself back through others. Imports under `if TYPE_CHECKING:` are types
only and are not counted; imports inside functions are."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where each part of the package lives in the source tree (kernels/ and tui/ sit at the top)
SOURCES = {"splitnode": ROOT / "splitnode", "splitnode.kernels": ROOT / "kernels", "splitnode.tui": ROOT / "tui"}


def _modules() -> dict[str, Path]:
    mods = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join((prefix, *parts))] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports when it runs."""
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - child.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                # `from pkg import submodule` runs the submodule; `from module import name` the module
                for a in child.names:
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_layout_is_what_the_readme_describes():
    mods = _modules()
    for pkg in ("splitnode.engine", "splitnode.runtime", "splitnode.model", "splitnode.api", "splitnode.kernels",
                "splitnode.tui"):
        assert pkg in mods, pkg
    for name in ("engine.engine", "engine.batcher", "engine.kv", "engine.sequence", "runtime.worker",
                 "runtime.router", "runtime.pools", "runtime.transfer", "runtime.messages", "runtime.status"):
        assert f"splitnode.{name}" in mods, name


def test_the_engine_and_the_model_never_import_the_runtime_the_api_or_the_tui():
    bad = {(m, d) for m, deps in _graph().items() if _under(m, "splitnode.engine", "splitnode.model",
                                                              "splitnode.kernels")
           for d in deps if _under(d, "splitnode.runtime", "splitnode.api", "splitnode.tui")}
    assert not bad, sorted(bad)


def test_the_runtime_never_imports_the_api_or_the_tui():
    bad = {(m, d) for m, deps in _graph().items() if _under(m, "splitnode.runtime")
           for d in deps if _under(d, "splitnode.api", "splitnode.tui")}
    assert not bad, sorted(bad)


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                dfs(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_circle_and_a_wrong_way_import(tmp_path, monkeypatch):
    """The rules above would fail on a package that breaks them."""
    pkg = tmp_path / "splitnode"
    for sub in ("engine", "runtime"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "a.py").write_text("from splitnode.runtime import b\n")
    (pkg / "runtime" / "b.py").write_text("def f():\n    import splitnode.engine.a\n")
    monkeypatch.setitem(SOURCES, "splitnode", pkg)
    monkeypatch.delitem(SOURCES, "splitnode.kernels")
    monkeypatch.delitem(SOURCES, "splitnode.tui")
    graph = _graph()
    assert graph["splitnode.engine.a"] == {"splitnode.runtime.b"}
    assert graph["splitnode.runtime.b"] == {"splitnode.engine.a"}


def test_ruff_is_clean():
    """The lint rules in pyproject.toml hold over the whole tree."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency (pip install -e '.[test]')"
    done = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
