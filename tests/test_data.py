"""Reading rows: formats, field names, ids, and every kind of bad input the issue lists."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alpagasus_ray.config import DataConfig
from alpagasus_ray.store.inputs import INVALID_REASON, SET_ASIDE_STATUS, read_rows
from alpagasus_ray.errors import InputError

from testdata import DOLLY_400, scale_data


def _rows(path, **kw):
    result = read_rows(DataConfig(path=str(path), **kw))
    return result, {r["source"].rsplit(":", 1)[-1]: r for r in result.table.to_pylist()}


def _write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_bad_row_is_kept_with_its_reason(tmp_path):
    good = {"instruction": "Add 2 and 2.", "input": "", "output": "4"}
    lines = [
        json.dumps(good).encode(),                                            # line 1
        json.dumps({"instruction": "No output here."}).encode(),              # line 2
        json.dumps({"instruction": 42, "output": "x"}).encode(),              # line 3
        b'{"instruction": "broken", "output": ',                              # line 4
        b'{"instruction": "caf\xe9", "input": "", "output": "latin-1 bytes"}',  # line 5
        json.dumps({"instruction": "big", "input": "", "output": "y" * 1_048_576}).encode(),  # line 6
        json.dumps(["not", "an", "object"]).encode(),                         # line 7
        json.dumps({"instruction": "no input field", "output": "fine"}).encode(),  # line 8
    ]
    result, by_line = _rows(_write_lines(tmp_path / "rows.jsonl", lines))
    assert result.table.num_rows == len(lines)  # nothing dropped
    reasons = {line: row[INVALID_REASON] for line, row in by_line.items()}
    assert reasons["1"] is None and reasons["8"] is None
    assert reasons["2"] == "missing field 'output'"
    assert reasons["3"] == "field 'instruction' is int, expected a string"
    assert reasons["4"].startswith("not valid JSON")
    assert reasons["5"] == "field 'instruction' is not valid UTF-8"
    assert "more than data.max_row_chars" in reasons["6"]
    assert reasons["7"] == "a row is a JSON object, got list"
    assert result.num_invalid == 6
    assert by_line["5"]["instruction"] == "caf\ufffd"  # stored, with the bad byte marked
    assert all(row["source"].startswith(str(tmp_path / "rows.jsonl")) for row in by_line.values())


def test_unreadable_files_stop_with_the_file_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty.jsonl: the file is empty"):
        read_rows(DataConfig(path=str(empty)))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]')
    with pytest.raises(InputError, match=r"broken.json: line 3 column 18: not valid JSON"):
        read_rows(DataConfig(path=str(broken)))
    with pytest.raises(InputError, match="missing.json: no such file"):
        read_rows(DataConfig(path=str(tmp_path / "missing.json")))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="bad.parquet: not a readable Parquet file"):
        read_rows(DataConfig(path=str(tmp_path / "bad.parquet")))


def test_ids_are_stable_given_ids_are_kept_and_repeats_reported(tmp_path):
    rows = [
        {"id": "a", "instruction": "i1", "output": "o1"},
        {"id": "a", "instruction": "i2", "output": "o2"},
        {"instruction": "same", "input": "", "output": "text"},
        {"instruction": "same", "input": "", "output": "text"},
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    first = read_rows(DataConfig(path=str(path)))
    ids = first.table["id"].to_pylist()
    assert ids[:2] == ["a", "a~2"]
    assert ids[3] == ids[2] + "~2"
    assert len(set(ids)) == 4
    assert set(first.duplicate_ids) == {"a", ids[2]}
    assert first.duplicate_ids["a"] == [f"{path}[0]", f"{path}[1]"]
    assert read_rows(DataConfig(path=str(path))).table["id"].to_pylist() == ids  # a rerun gives the same ids


def test_the_whole_alpaca_file_reads_with_unique_ids():
    alpaca = read_rows(DataConfig(path=scale_data("alpaca_52k_reconstructed.json")))
    assert alpaca.table.num_rows == 52_002 and alpaca.num_invalid == 0
    assert len(set(alpaca.table["id"].to_pylist())) == 52_002


def test_a_dolly_file_reads_under_the_alpaca_names():
    dolly = read_rows(DataConfig(path=DOLLY_400, limit=50))
    assert dolly.table.num_rows == 50 and dolly.num_invalid == 0
    original = json.load(open(DOLLY_400))[:50]
    # Dolly's fields arrive under the Alpaca names (this copy already uses input/output; see the next test)
    assert dolly.table["output"].to_pylist() == [r["output"] for r in original]


def test_dolly_field_names_parquet_and_directories(tmp_path):
    dolly_rows = [{"instruction": f"q{i}", "context": f"c{i}", "response": f"r{i}", "category": "qa"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(dolly_rows), tmp_path / "part-0.parquet")
    (tmp_path / "part-1.jsonl").write_text(json.dumps({"instruction": "q5", "response": "r5"}) + "\n")
    (tmp_path / "_ignored.jsonl").write_text("not json\n")
    result = read_rows(DataConfig(path=str(tmp_path)))
    table = result.table.to_pylist()
    assert [r["input"] for r in table] == ["c0", "c1", "c2", "c3", "c4", ""]
    assert [r["output"] for r in table] == ["r0", "r1", "r2", "r3", "r4", "r5"]
    assert result.num_invalid == 0
    assert table[2]["source"] == f"{tmp_path}/part-0.parquet[2]"


def test_field_map_renames_custom_fields(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c", "uid": 7}) + "\n")
    result = read_rows(DataConfig(path=str(path), id_field="uid", field_map={"prompt": "instruction", "completion": "output"}))
    assert result.table.to_pylist()[0] | {"source": None} == {
        "id": "7", "instruction": "p", "input": "", "output": "c", "messages": None, "formatting": "alpaca",
        "source": None, INVALID_REASON: None, SET_ASIDE_STATUS: None,
    }


def test_uri_paths_go_through_the_filesystem_layer(tmp_path):
    """s3:// and gs:// take the same path through pyarrow's filesystems as file:// does here."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    result = read_rows(DataConfig(path=f"file://{tmp_path}/d"))
    assert result.files == [f"file://{tmp_path}/d/a.jsonl"]
    assert result.table.to_pylist()[0]["source"] == f"file://{tmp_path}/d/a.jsonl:1"
    with pytest.raises(InputError, match="no such file"):
        read_rows(DataConfig(path=f"file://{tmp_path}/missing.jsonl"))
