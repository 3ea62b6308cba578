"""Layering: no import runs from a lower folder up to a higher one.

Floors, top to bottom: scripts/ (not installed), agent/, evaluators/, memory/, editors/. A module may import its own
folder and any folder below it, never one above. Every import statement counts, also those inside functions (lazy
imports), so the modules are read with `ast` rather than imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ["scripts", "agent", "evaluators", "memory", "editors"]  # top to bottom


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in `source`, at any depth."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def upward_imports(floor: str, source: str, where: str) -> list[str]:
    """The imports of a module on `floor` that reach a floor above it, one line each."""
    bad = []
    for line, module in imported_modules(source):
        top = module.split(".")[0]
        if top in FLOORS and FLOORS.index(top) < FLOORS.index(floor):
            bad.append(f"{where}:{line} imports {module}: {top}/ is above {floor}/")
    return bad


def project_modules() -> list[Path]:
    return sorted(p for floor in FLOORS for p in (ROOT / floor).rglob("*.py"))


def test_no_import_runs_back_up():
    modules = project_modules()
    assert ROOT / "editors" / "stats.py" in modules and ROOT / "scripts" / "feedbench.py" in modules
    bad = [b for p in modules for b in upward_imports(p.relative_to(ROOT).parts[0], p.read_text(),
                                                       str(p.relative_to(ROOT)))]
    assert not bad, "imports running back up:\n" + "\n".join(bad)


def test_the_check_sees_lazy_and_plain_imports_up_and_allows_imports_down():
    lazy = "def default_corpus():\n    from evaluators.corpus import stats_text\n    return stats_text()\n"
    assert upward_imports("editors", lazy, "editors/stats.py") == [
        "editors/stats.py:2 imports evaluators.corpus: evaluators/ is above editors/"]
    assert upward_imports("memory", "import agent.feed\n", "m.py") == ["m.py:1 imports agent.feed: agent/ is above memory/"]
    assert upward_imports("evaluators", "from scripts import feedbench\n", "e.py") != []
    down = "import torch\nfrom editors.arch import weight_view\nfrom memory import planner\nfrom evaluators import norms\n"
    assert upward_imports("agent", down, "a.py") == []
