"""Dependencies point one way (DESIGN.md §2): a forbidden import edge fails this test."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("emulator", "rl_agent", "pools", "slurm", "analysis")
# package -> fedemu packages it must never import
FORBIDDEN = {
    "emulator": {"rl_agent", "analysis", "slurm"},
    "pools": {"emulator", "rl_agent", "slurm", "analysis"},
    "analysis": {"emulator", "rl_agent", "pools", "slurm"},
    "rl_agent": {"analysis", "slurm"},
    "slurm": {"rl_agent", "analysis"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def test_top_level_packages_exist() -> None:
    for pkg in PACKAGES:
        assert (REPO / pkg / "__init__.py").is_file(), pkg


# The CLI is the one place that wires the packages together (DESIGN.md §2).
WIRING = {REPO / "emulator" / "cli.py": {"rl_agent", "analysis", "slurm"}}


def test_no_forbidden_import_edges() -> None:
    bad = []
    for pkg, forbidden in FORBIDDEN.items():
        for path in sorted((REPO / pkg).rglob("*.py")):
            for target in imported_packages(path) & (forbidden - WIRING.get(path, set())):
                bad.append(f"{path.relative_to(REPO)} imports {target}")
    assert bad == []


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import analysis.read\nfrom rl_agent import env\nimport os\n")
    assert imported_packages(probe) == {"analysis", "rl_agent"}
