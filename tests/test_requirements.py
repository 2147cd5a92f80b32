"""requirements.txt matches the code: every third-party distribution the code or the tests import is pinned with
`==`, and every pinned one is imported (or named in requirements.txt as needed by a library on our code paths)."""
from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

from tests.conftest import REPO

FIRST_PARTY = {"common", "models", "data", "eval", "recipes", "tests", "slurm"}
INDIRECT = {"accelerate", "sentencepiece", "tensorboard"}  # see their comments in requirements.txt
OWN_ENVIRONMENT = {"mmdet"}  # GenEval's own detector: imported only when chosen, never installed here


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    """Distribution → the whole requirement line, for every requirement of requirements.txt."""
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return {normalise(re.split(r"[=<>!~\[ ]", line)[0]): line for line in lines if line}


def imported_modules() -> set[str]:
    """Top-level names of every absolute import in the repo's Python files."""
    names = set()
    for folder in FIRST_PARTY:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - FIRST_PARTY - set(sys.stdlib_module_names)


def test_every_import_is_pinned_and_every_pin_is_imported():
    distributions = packages_distributions()
    third_party = imported_modules() - OWN_ENVIRONMENT
    unknown = sorted(m for m in third_party if m not in distributions)
    assert not unknown, f"imports that no installed distribution provides: {unknown}"
    needed = {normalise(distributions[m][0]) for m in third_party}
    requirements = pinned()
    assert sorted(needed - set(requirements)) == [], "imported but not in requirements.txt"
    assert sorted(set(requirements) - needed - INDIRECT) == [], "in requirements.txt but imported by nothing"
    assert [line for line in requirements.values() if "==" not in line] == [], "every requirement is pinned"
