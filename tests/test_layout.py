"""The shape of the code, held as tests: small modules, no import cycles, contracts that can fail.

`make lint` runs the import contracts (pyproject.toml, [tool.importlinter]); these tests keep what the
contracts do not say: no module past 600 lines, no cycle between modules, and the contracts themselves
able to catch the imports they forbid.
"""

from __future__ import annotations

import grimp
import pytest
from importlinter.application import use_cases
from importlinter.application.app_config import settings
from importlinter.application.ports.building import GraphBuilder
from importlinter.application.use_cases import create_report, read_user_options
from importlinter.configuration import configure

from tests.conftest import REPO

MAX_LINES = 600


def test_no_module_is_past_600_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in (REPO / "proxy").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern: {long}"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan), i.e. import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("proxy", cache_dir=None)
    # a package importing its own modules (an __init__ re-exporting) is not a cycle between concepts
    for package in ("proxy.policy", "proxy.keys", "proxy.audit", "proxy.cli"):
        for child in graph.find_children(package):
            if graph.direct_import_exists(importer=package, imported=child):
                graph.remove_import(importer=package, imported=child)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("a", "b", "c"):
        graph.add_module(name)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="a")
    assert _cycles(graph) == [["a", "b", "c"]]


class _WithImport(GraphBuilder):
    """The real graph of `proxy`, plus one import someone might add."""

    def __init__(self, importer: str | None = None, imported: str | None = None) -> None:
        self.extra = (importer, imported)

    def build(self, root_package_names: list[str], cache_dir: str | None, include_external_packages: bool = False,
              exclude_type_checking_imports: bool = False) -> grimp.ImportGraph:
        graph = grimp.build_graph(*root_package_names, include_external_packages=include_external_packages,
                                  exclude_type_checking_imports=exclude_type_checking_imports, cache_dir=None)
        importer, imported = self.extra
        if importer and imported:
            graph.add_import(importer=importer, imported=imported)
        return graph


def _broken(builder: _WithImport) -> list[str]:
    configure()
    use_cases._register_built_in_contract_types()
    settings.configure(GRAPH_BUILDER=builder)
    try:
        report = create_report(read_user_options(str(REPO / "pyproject.toml")), cache_dir=None)
    finally:
        configure()
    assert not report.could_not_run
    return [contract.name for contract, check in report.get_contracts_and_checks() if not check.kept]


def test_the_contracts_hold() -> None:
    assert _broken(_WithImport()) == []


@pytest.mark.parametrize(("importer", "imported", "contract"), [
    ("proxy.policy.bundle", "proxy.app", "The app sits on the request path"),
    ("proxy.keys.ring", "proxy.cli.keys", "The app sits on the request path"),
    ("proxy.policy.bundle", "proxy.redact", "The app sits on the request path"),
    ("proxy.audit.trail", "proxy.runtime", "The app sits on the request path"),
    ("proxy.policy.reload", "proxy.policy.review", "The policy's core never uses"),
    ("proxy.policy.bundle", "proxy.policy.expectations", "The policy's core never uses"),
    ("proxy.audit.trail", "proxy.policy.decision", "Keys and audit never use the policy's decisions"),
    ("proxy.keys.migration", "proxy.policy.bundle", "Keys and audit never use the policy's decisions"),
    ("proxy.keys.cipher", "proxy.audit.record", "Keys and audit know nothing of each other"),
])
def test_each_contract_breaks_on_the_import_it_forbids(importer: str, imported: str, contract: str) -> None:
    broken = _broken(_WithImport(importer, imported))
    assert any(name.startswith(contract) for name in broken), broken
