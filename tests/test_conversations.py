"""Conversations (`messages`, ShareGPT, a column mapping): how they are read, checked and given ids."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alpagasus_ray.config import DataConfig
from alpagasus_ray.errors import InputError
from alpagasus_ray.store.inputs import INVALID_REASON, read_rows

SYSTEM = {"role": "system", "content": "Answer in one line."}
TWO_TURNS = [
    {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
    {"role": "user", "content": "And an even one?"}, {"role": "assistant", "content": "2"},
]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def _sharegpt(messages):
    return [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_messages_sharegpt_and_a_mapped_layout_read_as_the_same_conversation(tmp_path):
    messages = _jsonl(tmp_path / "messages.jsonl", [{"messages": [SYSTEM, *TWO_TURNS]}])
    sharegpt = _jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": _sharegpt([SYSTEM, *TWO_TURNS])}])
    # A layout of its own, described as LLaMA-Factory's dataset_info.json would: a system field
    # beside the turns, other keys and role names.
    speakers = {"user": "customer", "assistant": "agent"}
    own = [{"speaker": speakers[m["role"]], "text": m["content"]} for m in TWO_TURNS]
    mapped = _jsonl(tmp_path / "mapped.jsonl", [{"dialog": own, "prompt": SYSTEM["content"]}])
    columns = {"messages": "dialog", "system": "prompt", "role_tag": "speaker", "content_tag": "text",
               "user_tag": "customer", "assistant_tag": ["agent", "bot"]}

    read = {
        "messages": read_rows(DataConfig(path=messages)).table.to_pylist()[0],
        "sharegpt": read_rows(DataConfig(path=sharegpt)).table.to_pylist()[0],
        "mapped": read_rows(DataConfig(path=mapped, formatting="messages", columns=columns)).table.to_pylist()[0],
    }
    for name, row in read.items():
        assert row[INVALID_REASON] is None, name
        assert row["messages"] == [SYSTEM, *TWO_TURNS], name
        assert row["instruction"] is None
    assert read["messages"]["formatting"] == "messages" and read["sharegpt"]["formatting"] == "sharegpt"
    # The same conversation has the same id however it was written, and again on a rerun.
    assert len({row["id"] for row in read.values()}) == 1
    assert read_rows(DataConfig(path=sharegpt)).table["id"].to_pylist() == [read["sharegpt"]["id"]]


def test_every_bad_conversation_is_set_aside_with_its_reason(tmp_path):
    user, bot = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    rows = [
        {"messages": [SYSTEM, user, bot]},                                        # 1 good
        {"messages": [user]},                                                     # 2
        {"messages": [user, {"role": "assistant", "content": "  "}]},             # 3
        {"messages": [user, {"role": "assistant", "content": ["a", "list"]}]},    # 4
        {"messages": [user, {"role": "tool", "content": "42"}]},                  # 5
        {"messages": [user, user, bot]},                                          # 6
        {"messages": [bot, user]},                                                # 7
        {"messages": [user, bot, SYSTEM, user, bot]},                             # 8
        {"messages": [user, bot, {"role": "user", "content": "Thanks!"}]},        # 9 good: the last user turn is kept
        {"messages": "Hi there"},                                                 # 10
        {"messages": [user, "Hello"]},                                            # 11
        {"instruction": "An alpaca row", "output": "in a conversation file"},     # 12
        {"messages": [user, {"role": "assistant", "content": "x" * 50}]},         # 13
        {"messages": [{"role": "user", "content": "caf\udce9"}, bot]},            # 14
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), errors="surrogatepass")
    result = read_rows(DataConfig(path=str(path), max_row_chars=40))
    assert result.table.num_rows == len(rows)  # rows in == rows out, set aside or not
    reasons = {int(r["source"].rsplit(":", 1)[1]): r[INVALID_REASON] for r in result.table.to_pylist()}
    assert reasons[1] is None and reasons[9] is None
    assert reasons[2] == "no assistant turn"
    assert reasons[3] == "turn 2: empty assistant turn"
    assert reasons[4] == "turn 2: 'content' is list, expected a string"
    assert reasons[5] == "turn 2: unknown role 'tool' (known: assistant, system, user; see data.columns)"
    assert reasons[6] == "turn 2: user after user (turns alternate user / assistant)"
    assert reasons[7] == "turn 1: the conversation starts with an assistant turn"
    assert reasons[8] == "turn 3: a system turn after the first turn"
    assert reasons[10] == "field 'messages' is str, expected a list of turns"
    assert reasons[11] == "turn 2 is str, expected an object"
    assert reasons[12].startswith("an alpaca row in a file read as messages (data.formatting=auto chose it")
    assert reasons[13] == "conversation has 52 characters, more than data.max_row_chars=40"
    assert reasons[14] == "turn 1: not valid UTF-8"
    assert result.num_invalid == 12
    # Every row has its own id, the same on a rerun.
    ids = result.table["id"].to_pylist()
    assert len(set(ids)) == len(rows)
    assert read_rows(DataConfig(path=str(path), max_row_chars=40)).table["id"].to_pylist() == ids


def test_auto_decides_per_file_and_refuses_to_mix_alpaca_rows_with_conversations(tmp_path):
    chats = tmp_path / "chats"
    chats.mkdir()
    _jsonl(chats / "a.jsonl", [{"messages": TWO_TURNS}])
    _jsonl(chats / "b.jsonl", [{"conversations": _sharegpt(TWO_TURNS)}])
    table = read_rows(DataConfig(path=str(chats))).table
    assert table["formatting"].to_pylist() == ["messages", "sharegpt"]
    assert table["messages"].to_pylist() == [TWO_TURNS, TWO_TURNS]
    # Told the formatting, a file of the other shape has every row set aside with the reason.
    told = read_rows(DataConfig(path=str(chats), formatting="sharegpt")).table
    assert told[INVALID_REASON].to_pylist() == ["missing field 'conversations'", None]
    _jsonl(chats / "c.jsonl", [{"instruction": "Add 2 and 2.", "output": "4"}])
    with pytest.raises(InputError, match=r"mixes alpaca rows \(.*c.jsonl\) and messages conversations"):
        read_rows(DataConfig(path=str(chats)))


def test_a_hugging_face_dataset_saved_as_parquet_shards(tmp_path):
    shards = tmp_path / "data"
    shards.mkdir()
    for k in range(2):
        rows = [{"messages": [SYSTEM, *TWO_TURNS[:2]], "id": f"{k}-{i}", "source": "hub"} for i in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), shards / f"train-{k:05d}-of-00002.parquet")
    table = read_rows(DataConfig(path=str(tmp_path))).table
    assert table["id"].to_pylist() == ["0-0", "0-1", "0-2", "1-0", "1-1", "1-2"]
    assert table["formatting"].unique().to_pylist() == ["messages"]
    assert table[INVALID_REASON].null_count == 6
    assert table["messages"].to_pylist()[0] == [SYSTEM, *TWO_TURNS[:2]]
