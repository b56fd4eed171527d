"""Conversations (`messages`, ShareGPT, a column mapping): read, checked, rated by turn or whole, selected and
trained on with the chat template; the chat demo."""

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


# Rating conversations against a local server that scores each request by the last marker in it:
# the turn being rated comes last, so a turn shown with the turns after it would get their score.
MARKER = r"SCORE=(\d(?:\.5)?)"


def _conversation(*scores, system=True, last=None):
    """A conversation whose i-th assistant turn carries the marker of scores[i] (or is `last`)."""
    turns = [SYSTEM] if system else []
    for i, score in enumerate(scores):
        turns.append({"role": "user", "content": f"Question {i + 1}?"})
        turns.append({"role": "assistant", "content": f"Answer {i + 1}. SCORE={score}"})
    if last is not None:
        turns[-1] = {"role": "assistant", "content": last}
    return turns


def _rate(tmp_path, url, data, *overrides):
    from alpagasus_ray.config import load_config
    from alpagasus_ray.stages.rate import run_rate

    config = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"data.path={data}", "rate.backend=openai", f"rate.base_url={url}",
        "rate.model=fake", "rate.max_retries=0", "rate.concurrency=4", "rate.batch_size=2", *overrides,
    ])
    return run_rate(config)


def _rated(tmp_path):
    from alpagasus_ray.store.rated import RatedStore

    return {r["id"]: r for r in RatedStore(str(tmp_path / "run"), chat=True).read().to_pylist()}


def test_each_turn_is_rated_in_its_context_and_the_conversation_takes_the_aggregate(tmp_path, ray_local):
    from fake_openai_server import serve, stats

    chats = tmp_path / "chats"
    chats.mkdir()
    _jsonl(chats / "a.jsonl", [
        {"id": "three", "messages": _conversation(4, 2.5, 5)},
        {"id": "unreadable", "messages": _conversation(3, 0, last="Answer 2. UNREADABLE")},
        {"id": "no-answer", "messages": [{"role": "user", "content": "Hello?"}]},
    ])
    _jsonl(chats / "b.jsonl", [{"id": "sharegpt", "conversations": _sharegpt(_conversation(1, 4.5, system=False))}])
    rules = [{"match": "UNREADABLE", "reply": "I cannot rate this."}]
    with serve({"marker": MARKER, "rules": rules}) as url:
        summary = _rate(tmp_path, url, chats)
        sent = stats(url)["requests"]
        rated = _rated(tmp_path)
        # The same run directory with another aggregate: every turn is rated already, nothing is sent.
        again = _rate(tmp_path, url, chats, "rate.aggregate=mean")
        assert stats(url)["requests"] == sent
        by_mean = _rated(tmp_path)
        _rate(tmp_path, url, chats, "rate.aggregate=last")
        by_last = _rated(tmp_path)
        assert stats(url)["requests"] == sent

    assert summary["rows_in"] == summary["rows_out"] == 4 == len(rated)  # one row per conversation
    assert summary["by_status"] == {"ok": 2, "parse_failed": 1, "request_failed": 0, "invalid_input": 1, "too_long": 0}
    # 3 + 2 + 2 assistant turns; the unreadable one is asked once more
    assert summary["turns"]["by_status"]["ok"] == 6 and summary["turns"]["rated"] == 7 and sent == 8
    three = rated["three"]
    assert three["turn_scores"] == [4.0, 2.5, 5.0] and three["turn_statuses"] == ["ok"] * 3
    assert three["status"] == "ok" and three["score"] == 2.5 and three["unit"] == "turn"
    assert by_mean["three"]["score"] == pytest.approx(23 / 6) and by_last["three"]["score"] == 5.0
    assert rated["sharegpt"]["turn_scores"] == [1.0, 4.5] and rated["sharegpt"]["score"] == 1.0
    assert rated["sharegpt"]["formatting"] == "sharegpt"
    assert rated["three"]["messages"] == _conversation(4, 2.5, 5)
    # A turn that cannot be rated leaves its conversation with no score, naming the turn.
    unreadable = rated["unreadable"]
    assert unreadable["status"] == "parse_failed" and unreadable["score"] is None
    assert unreadable["turn_scores"] == [3.0, None] and unreadable["turn_statuses"] == ["ok", "parse_failed"]
    assert unreadable["error"].startswith("turn 5: parse_failed:")
    assert rated["no-answer"]["status"] == "invalid_input" and rated["no-answer"]["error"] == "no assistant turn"
    assert again["by_status"] == summary["by_status"]

    # Selecting on the conversations' score (here the `last` aggregate: 5.0 and 4.5): each is written
    # in its own layout in selected.json, and as `messages` in selected.jsonl.
    from alpagasus_ray.config import load_config
    from alpagasus_ray.stages.filter import run_filter

    record = run_filter(load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={chats}",
                                           "filter.threshold=4.5", "filter.plots=false"]))
    assert record["selected"] == 2 and record["pool"] == 2 and record["rows_are"] == "conversations"
    assert record["assistant_turns_selected"] == 5
    as_read = {r["id"]: r for r in json.load(open(tmp_path / "run" / "selected.json"))}
    assert as_read["three"]["messages"] == _conversation(4, 2.5, 5) and as_read["three"]["score"] == 5.0
    assert as_read["sharegpt"]["conversations"] == _sharegpt(_conversation(1, 4.5, system=False))
    lines = [json.loads(line) for line in open(tmp_path / "run" / "selected.jsonl")]
    assert {r["id"]: r["messages"] for r in lines} == {
        "three": _conversation(4, 2.5, 5), "sharegpt": _conversation(1, 4.5, system=False)}


def test_a_conversation_rated_whole_is_one_request(tmp_path, ray_local):
    from fake_openai_server import serve, stats

    data = _jsonl(tmp_path / "chats.jsonl", [{"id": "three", "messages": _conversation(4, 2.5, 5)},
                                             {"id": "one", "messages": _conversation(3.5)}])
    with serve({"marker": MARKER}) as url:
        summary = _rate(tmp_path, url, data, "rate.unit=conversation")
        assert stats(url)["requests"] == 2
    rated = _rated(tmp_path)
    assert summary["by_status"]["ok"] == 2
    # The grader sees the whole exchange, so the last marker is the last turn's.
    assert rated["three"]["score"] == 5.0 and rated["one"]["score"] == 3.5
    assert rated["three"]["unit"] == "conversation" and rated["three"]["turn_scores"] is None


def test_a_conversation_too_long_for_the_grader_is_set_aside_before_sending(tmp_path, ray_local):
    from fake_openai_server import serve, stats

    long_answer = "word " * 1600  # ~2,000 estimated tokens: more than the context below
    data = _jsonl(tmp_path / "chats.jsonl", [
        {"id": "short", "messages": _conversation(4, 3)},
        # The long answer comes first: rating the last turn shows it, so the conversation cannot be rated.
        {"id": "long-early", "messages": [SYSTEM, {"role": "user", "content": "Question 1?"},
                                          {"role": "assistant", "content": long_answer}, *_conversation(2, system=False)]},
        {"id": "no-answer", "messages": [{"role": "user", "content": "Hello?"}]},
    ])
    context = ["rate.context_tokens=1500"]
    with serve({"marker": MARKER}) as url:
        from alpagasus_ray.config import load_config
        from alpagasus_ray.stages.rate import run_rate

        dry = run_rate(load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={data}", "rate.backend=openai",
                                          f"rate.base_url={url}", "rate.model=fake", *context]), dry_run=True)
        summary = _rate(tmp_path, url, data, *context)
        sent = stats(url)["requests"]
    assert dry["too_long"] == 1 and dry["invalid_input"] == 1 and dry["to_send"] == 2  # the short one's two turns
    assert dry["context"] == {"tokens": 1500, "key": "rate.context_tokens",
                              "counted_by": "an estimate of 4 characters a token"}
    assert sent == 2 and summary["rows_in"] == summary["rows_out"] == 3
    assert summary["by_status"] == {"ok": 1, "parse_failed": 0, "request_failed": 0, "invalid_input": 1, "too_long": 1}
    long = _rated(tmp_path)["long-early"]
    assert long["status"] == "too_long" and long["score"] is None and long["turn_scores"] is None
    assert "more than the grader's context of 1,500 (rate.context_tokens" in long["error"]


def test_the_context_is_counted_exactly_with_the_graders_tokenizer(tiny_model):
    """Against a vLLM engine's context, a request is measured with the model's own tokenizer and
    chat template: it fits at exactly max_model_len tokens, and not one more."""
    from transformers import AutoTokenizer

    from alpagasus_ray.llm.context import Context
    from alpagasus_ray.llm.task import Request

    messages = [SYSTEM, {"role": "user", "content": "Rate this. " * 300}]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = len(tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))["input_ids"])
    request = Request(messages=messages, max_tokens=4)
    assert Context(prompt + 4, "max_model_len", tiny_model).too_long(request) is None
    assert Context(prompt + 3, "max_model_len", tiny_model).too_long(request) == prompt + 4


# Fine-tuning on conversations with the model's chat template.

def _dialog(k):
    turns = [{"role": "system", "content": f"You are assistant number {k}."}]
    for t in range(1 + k % 3):
        turns += [{"role": "user", "content": f"What is {k} plus {t}?"},
                  {"role": "assistant", "content": f"It is {k + t}. Happy to help."}]
    return turns


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_the_chat_loss_mask_is_the_assistant_turns_token_by_token(tmp_path, tiny_model, train_on):
    from transformers import AutoTokenizer

    from alpagasus_ray.config import TrainConfig
    from alpagasus_ray.rules.recipe import IGNORE, collate, pack
    from alpagasus_ray.stages.train import _tokenize

    dialogs = [_dialog(k) for k in range(12)]
    dialogs[0] = [*dialogs[0], {"role": "user", "content": "And a last question with no reply?"}]
    data = _jsonl(tmp_path / "chats.jsonl", [{"messages": d} for d in dialogs])
    examples, dropped = _tokenize(data, tiny_model, TrainConfig(train_on=train_on, max_length=4096))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert dropped == 0 and len(examples) == len(dialogs)
    for dialog, example in zip(dialogs, examples):
        answers = [m["content"] for m in dialog if m["role"] == "assistant"]
        learned = answers if train_on == "all" else answers[-1:]
        # Every token is the template's rendering of the conversation (the unanswered last turn left out) ...
        rendered = tokenizer.apply_chat_template([m for m in dialog if m["content"] != "And a last question with no reply?"],
                                                 tokenize=False)
        assert tokenizer.decode(example.input_ids) == rendered
        # ... and exactly the learned assistant turns carry labels, each with its end-of-turn token.
        assert all(label in (IGNORE, token) for token, label in zip(example.input_ids, example.labels))
        spans, current = [], []
        for token, label in zip(example.input_ids, example.labels):
            if label != IGNORE:
                current.append(token)
            elif current:
                spans.append(current)
                current = []
        spans += [current] if current else []
        assert [tokenizer.decode(span) for span in spans] == [f"{a}</s>" for a in learned]
        assert dialog[0]["content"] in tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l == IGNORE])
    # Packed, each example keeps its tokens and labels and its positions restart.
    rows = pack([len(e.input_ids) for e in examples], max_length=256)
    batch = collate([[examples[i] for i in row] for row in rows], pad_id=tokenizer.pad_token_id)
    for row, labels, positions in zip(rows, batch["labels"], batch["position_ids"]):
        joined = [label for i in row for label in examples[i].labels]
        assert labels[:len(joined)] == joined and set(labels[len(joined):]) <= {IGNORE}
        assert positions[:len(examples[row[0]].input_ids)] == list(range(len(examples[row[0]].input_ids)))


def test_a_tokenizer_without_a_chat_template_is_an_error_that_names_the_fix(tmp_path, tiny_model):
    import shutil

    from alpagasus_ray.config import TrainConfig
    from alpagasus_ray.stages.train import _tokenize

    bare = tmp_path / "bare-model"
    shutil.copytree(tiny_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    data = _jsonl(tmp_path / "chats.jsonl", [{"messages": _dialog(1)}])
    with pytest.raises(InputError, match="has no chat template: set train.chat_template"):
        _tokenize(data, str(bare), TrainConfig())
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    examples, _ = _tokenize(data, str(bare), TrainConfig(chat_template=str(template)))
    assert examples and any(label != -100 for label in examples[0].labels)


@pytest.mark.slow
def test_the_52k_alpaca_rows_as_conversations_select_the_same_ids(tmp_path, ray_local):
    """Each Alpaca row as a one-turn conversation (the user turn: instruction and input; the
    assistant turn: the output), rated against a server whose reply depends on the response alone,
    selects exactly the ids the Alpaca path selects."""
    from alpagasus_ray.config import load_config
    from alpagasus_ray.stages.filter import run_filter
    from alpagasus_ray.stages.rate import run_rate
    from alpagasus_ray.store.formatting import content_id
    from fake_openai_server import serve
    from testdata import alpaca_rows, scale_data

    rows = alpaca_rows()
    ids = [content_id(r["instruction"], r["input"], r["output"]) for r in rows]
    chats = _jsonl(tmp_path / "chats.jsonl", [
        {"id": rid, "messages": [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
                                 {"role": "assistant", "content": r["output"]}]}
        for rid, r in zip(ids, rows)])
    replies = [f"{s}\nA reply." for s in ("4.5", "4", "3.5", "5", "2")]
    selected = {}
    with serve({"replies": replies, "replies_by_response": True}) as url:
        for name, data in (("alpaca", scale_data("alpaca_52k_reconstructed.json")), ("chat", chats)):
            run_dir = tmp_path / name
            config = load_config(None, [f"run_dir={run_dir}", f"data.path={data}", "rate.backend=openai",
                                        f"rate.base_url={url}", "rate.model=fake", "rate.concurrency=64",
                                        "rate.num_workers=2", "rate.logprobs=false", "filter.plots=false"])
            summary = run_rate(config)
            # 49 Alpaca rows have an empty output: rated as Alpaca rows, but a conversation whose
            # assistant turn is empty is set aside.
            set_aside = 49 if name == "chat" else 0
            assert summary["rows_out"] == len(rows) and summary["by_status"]["invalid_input"] == set_aside
            assert summary["by_status"]["ok"] == len(rows) - set_aside
            run_filter(config)
            selected[name] = [json.loads(line)["id"] for line in open(run_dir / "selected.jsonl")]
    empty = {rid for rid, r in zip(ids, rows) if not r["output"].strip()}
    assert len(empty) == 49
    assert 9_000 < len(selected["alpaca"]) < 25_000  # two replies in five score >= 4.5
    assert sorted(selected["chat"]) == sorted(set(selected["alpaca"]) - empty)


@pytest.mark.slow
def test_kill_minus_nine_mid_rating_then_rerun_resends_only_the_turns_in_flight(tmp_path, reap_ray_orphans):
    """The driver and every Ray process it started are killed at once while turns are in flight;
    the same command again rates every conversation, sending again only turns that were not saved."""
    import os
    import subprocess
    import sys

    from alpagasus_ray.store.rated import TurnStore
    from fake_openai_server import serve, stats
    from processes import kill_job_when

    n = 32
    conversations = []
    for c in range(n):
        turns = [SYSTEM]
        for t in range(3):
            turns += [{"role": "user", "content": f"Question {t}?"},
                      {"role": "assistant", "content": f"Answer C{c:02d}-T{t}."}]
        conversations.append({"id": f"c{c:02d}", "messages": turns})
    data = _jsonl(tmp_path / "chats.jsonl", conversations)
    # A turn's request holds the turns before it too: the rule of its own (latest) marker comes first.
    rules = [{"match": f"C{c:02d}-T{t}"} for c in range(n) for t in (2, 1, 0)]
    run_dir = tmp_path / "run"
    with serve({"latency": 0.25, "rules": rules}) as url:
        command = [sys.executable, "-m", "alpagasus_ray.cli", "rate", "--config", "configs/rate_openai_compatible.yaml",
                   f"rate.base_url={url}", f"data.path={data}", f"run_dir={run_dir}", "rate.concurrency=4",
                   "rate.num_workers=1", "rate.batch_size=4"]
        env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
        turns = TurnStore(str(run_dir))
        kill_job_when(command, env, tmp_path / "first.log", lambda: len(turns.parts()) >= 3)
        saved = turns.read()["id"].to_pylist()
        assert not (run_dir / "rated").exists() or not os.listdir(run_dir / "rated")  # killed before assembling
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        seen = stats(url)
    assert second.returncode == 0, second.stderr[-3000:]
    rated = _rated(tmp_path)
    assert len(rated) == n and {r["status"] for r in rated.values()} == {"ok"}
    assert all(len(r["turn_scores"]) == 3 for r in rated.values())
    # Turns saved before the kill were never sent again; sent twice at most: the turns in flight
    # (rate.concurrency=4) and the answered turns of the batches partly done.
    markers = {f"C{int(i[1:3]):02d}-T{(int(i.split('@')[1]) - 3) // 2}" for i in saved}
    assert saved and all(seen["by_rule"][m] == 1 for m in markers)
    print("turns sent again after the kill:", seen["requests"] - 3 * n)
    assert seen["requests"] - 3 * n <= 4 + 4 + 3
