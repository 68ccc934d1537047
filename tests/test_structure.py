"""The shape of the package: no import circles, no module over the size limit.

Both read the source (``ast``), not the running interpreter, so they see every
module whether or not a test imports it.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vdsm_agent"
# "No module over ~400 lines except where its note says why" (issue 17): the note is
# a comment line starting with SIZE_NOTE, saying why the module is one module.
SIZE_LIMIT = 400
SIZE_NOTE = "# Longer than 400 lines:"
def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(body: list[ast.stmt], typing: bool = False
                  ) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it is imported: top level, and inside
    top-level ``if``/``try`` blocks, but not under ``if TYPE_CHECKING:`` (for the
    type checker only; unless ``typing``) and not inside functions (run later, by
    a caller)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if typing or not _type_checking(node):
                yield from _import_nodes(node.body, typing)
            yield from _import_nodes(node.orelse, typing)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(handler.body for handler in node.handlers),
                          node.orelse, node.finalbody):
                yield from _import_nodes(block, typing)


def imports_of(name: str, path: Path, typing: bool = False) -> set[str]:
    """The package's modules that ``name`` imports when it is imported (``typing``:
    and those it imports for the type checker only)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text()).body, typing):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            found.add(submodule if submodule in MODULES else source)
    return {module for module in found if module in MODULES and module != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_import_circles() -> None:
    """No module imports, directly or through others, a module that imports it
    (a circle works or breaks depending on which module is imported first)."""
    graph = {name: imports_of(name, path) for name, path in MODULES.items()}
    assert cycles(graph) == []


def test_the_engine_parts_import_no_circle_even_for_the_type_checker() -> None:
    """engine.py, jobs.py, poller.py and views.py imported one another (some for the
    type checker only): each now sees the others through ``engine/ports.py``
    (issue 19). The one pair left is the host worker and its events feed, one
    class split in two modules for size (``hostfeed.HostFeed`` is the worker's)."""
    engine = {name: path for name, path in MODULES.items()
              if name.startswith("vdsm_agent.engine")}
    graph = {name: imports_of(name, path, typing=True) & set(engine)
             for name, path in engine.items()}
    assert cycles(graph) == [["vdsm_agent.engine.hostfeed", "vdsm_agent.engine.poller"]]
    for part in ("jobs", "poller", "views"):
        assert "vdsm_agent.engine.engine" not in graph[f"vdsm_agent.engine.{part}"]
    assert "vdsm_agent.engine.poller" not in graph["vdsm_agent.engine.views"]
    assert "vdsm_agent.engine.poller" not in graph["vdsm_agent.engine.jobs"]


# The modules that make and drop the host workers: engine.py, and the host leases of
# several engines (engine/leases.py, issue 19) that hand hosts to it.
WORKER_OWNERS = {"vdsm_agent.engine.engine", "vdsm_agent.engine.leases"}


def reads_of_workers(path: Path) -> list[int]:
    """Lines where ``path`` reads an attribute ``workers`` (``engine.workers``)."""
    tree = ast.parse(path.read_text(), str(path))
    return sorted(node.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr == "workers")


def test_only_the_engine_knows_its_host_workers() -> None:
    """The console, the metrics, the health check, the output relay and the Gluster
    verbs see a host through ``engine.host(name)`` and ``engine.hosts()``
    (``ports.HostView``/``HostHandle``), never the engine's ``workers`` (issue 19)."""
    found = {name: lines for name, path in MODULES.items()
             if name not in WORKER_OWNERS and (lines := reads_of_workers(path))}
    assert found == {}, "use engine.host(name) / engine.hosts() (engine/ports.py)"
    assert reads_of_workers(MODULES["vdsm_agent.engine.engine"])  # the scan sees them


def test_the_circle_check_sees_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert imports_of("vdsm_agent.tasks.manager", MODULES["vdsm_agent.tasks.manager"]) >= {
        "vdsm_agent.tasks.supervisor", "vdsm_agent.errors", "vdsm_agent.common.clock"}


def _size_note(lines: list[str]) -> str:
    for line in lines:
        if line.startswith(SIZE_NOTE):
            return line[len(SIZE_NOTE):].strip()
    return ""


def test_a_module_over_the_size_limit_says_why() -> None:
    too_long = {}
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        if len(lines) > SIZE_LIMIT and len(_size_note(lines)) < 20:
            too_long[name] = len(lines)
    assert too_long == {}, (f"split these, or say why each is one module in a comment "
                            f"line starting {SIZE_NOTE!r}")


def test_the_layout_table_names_every_folder_and_top_level_module() -> None:
    """docs/design.md's layout table omitted connections/, events/, security/ and
    engine/: every package folder and top-level module of vdsm_agent, and every
    code folder of the repository, is named in it."""
    design = (ROOT / "docs" / "design.md").read_text()
    start = design.index("## Layout")
    table = design[start:design.index("\n## ", start + 1)]
    named = set(re.findall(r"`([^`]+)`", table))
    wanted = {f"{path.parent.relative_to(ROOT).as_posix()}/"
              for path in PACKAGE.rglob("__init__.py") if path.parent != PACKAGE}
    wanted |= {f"vdsm_agent/{path.name}" for path in PACKAGE.glob("*.py")
               if path.name != "__init__.py"}
    wanted |= {"rpc_schema/", "benchmarks/", "packaging/", "scripts/", "tests/"}
    assert sorted(wanted - named) == []
