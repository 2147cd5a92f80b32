"""Prompt and JSON-lines files: line numbers kept, bad lines named as file:line."""
from __future__ import annotations

import pytest

from data.prompts import read_jsonl, read_prompts


def test_jsonl_lines_keep_their_numbers_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"prompt": "a cat"}\n\n[1, 2]\n')
    assert read_jsonl(path) == [(1, {"prompt": "a cat"}), (3, [1, 2])]
    with pytest.raises(ValueError, match=r"records.jsonl:3: each JSON line needs a string 'prompt' field"):
        read_prompts(path)
    path.write_text('{"prompt": "a cat"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"records.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_text_prompts_skip_blank_lines_and_comments(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n  a red cat  \n\n   # indented comment\nthe yellow car\n")
    assert read_prompts(path) == [{"prompt": "a red cat"}, {"prompt": "the yellow car"}]
    path.write_text("# only comments\n")
    with pytest.raises(ValueError, match="no prompts found"):
        read_prompts(path)
