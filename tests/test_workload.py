"""Prompt workloads: records read, bad files refused with the file and the reason."""

from __future__ import annotations

import pytest

from expertmap.cluster.workload import load_workload


def test_records_are_read_with_their_ids_and_categories(tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_text('{"id": "a", "category": "code", "turns": ["def f():"]}\n\n{"turns": ["Hello"]}\n')
    assert load_workload(f) == [
        {"id": "a", "category": "code", "prompt": "def f():"},
        {"id": "3", "category": "", "prompt": "Hello"},
    ]


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file"):
        load_workload(tmp_path / "nope.jsonl")


def test_a_bad_record_names_its_line(tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_text('{"turns": ["ok"]}\n{"prompt": "no turns"}\n')
    with pytest.raises(ValueError, match=r"w\.jsonl:2: not a workload record"):
        load_workload(f)
