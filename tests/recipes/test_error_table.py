"""docs/errors.md is what the code says: regenerating it (which makes every listed error happen) gives the file."""
from __future__ import annotations

from recipes.error_table import table
from tests.conftest import REPO


def test_the_error_table_in_docs_is_current():
    assert (REPO / "docs" / "errors.md").read_text(encoding="utf-8") == table(), \
        "docs/errors.md is stale: python -m recipes.error_table > docs/errors.md"
