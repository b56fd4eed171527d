"""Test sets and the judging rule: what the generate/judge/report stages stand on."""

import filecmp
import json
import os

import pytest

from alpagasus_ray.errors import InputError
from alpagasus_ray.rules.judging import TIE, WIN, combine, flip, judge_messages, parse_pair, parse_vicuna, winning_score
from alpagasus_ray.config import TEST_SETS
from alpagasus_ray.testsets import TESTSET_DIR, load_test_set
from testdata import scale_data

# Judge replies for 180 prompts: (reply with the candidate as Assistant 1, reply with the
# candidate as Assistant 2). By Sec. 3.3 they are 94 wins, 71 ties and 15 losses.
PAPER_CASES = ([("8 6", "6 8")] * 60 + [("8 6", "7 7")] * 34      # win twice / win + tie  -> 94 wins
               + [("7 7", "7 7")] * 50 + [("9 5", "9 5")] * 21    # tie twice / win + lose -> 71 ties
               + [("5 9", "9 5")] * 10 + [("6 6", "8 4")] * 5)    # lose twice / tie + lose -> 15 losses



@pytest.mark.parametrize("name", TEST_SETS)
def test_shipped_test_sets_are_the_released_files(name):
    released = scale_data(f"testsets/{name}.jsonl")
    assert filecmp.cmp(os.path.join(TESTSET_DIR, f"{name}.jsonl"), released, shallow=False)
    rows = load_test_set(released)
    assert rows == load_test_set(name)
    assert len({r["id"] for r in rows}) == len(rows) == {"koala": 180, "vicuna": 80, "wizardlm": 218, "sinstruct": 252}[name]


def test_categories_and_inputs_come_from_the_original_fields():
    vicuna = load_test_set("vicuna")
    assert len({r["category"] for r in vicuna}) == 9
    assert len({r["category"] for r in load_test_set("wizardlm")}) == 29
    first = json.loads(open(os.path.join(TESTSET_DIR, "sinstruct.jsonl")).readline())  # the original format
    assert load_test_set("sinstruct", limit=1)[0]["input"] == first["instances"][0]["input"]


def test_an_unknown_format_names_the_file_and_line(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"question": "?", "id": 1}) + "\n")
    with pytest.raises(InputError, match=r"odd.jsonl:1: unknown test-set format \(fields \['id', 'question'\]\)"):
        load_test_set(str(path))


def test_both_orders_combine_to_the_papers_counts_and_winning_score():
    """180 prompts judged twice from real reply strings: 94 wins, 71 ties, 15 losses -> 1.4389."""
    results = []
    for first_reply, second_reply in PAPER_CASES:
        as_first = parse_vicuna(first_reply).outcome
        as_second = flip(parse_vicuna(second_reply).outcome)  # the judge's Assistant 1 was the baseline
        results.append(combine(as_first, as_second))
    counts = {k: results.count(k) for k in ("win", "tie", "lose")}
    assert counts == {"win": 94, "tie": 71, "lose": 15}
    assert winning_score(**counts) == 1.4389


def test_pair_prompt_verdicts_and_positions():
    messages = judge_messages("Q?", "answer one", "answer two", prompt="pair")
    assert "[The Start of Assistant A's Answer]\nanswer one" in messages[1]["content"]
    assert parse_pair("...so [[B]]").outcome == "lose" and flip(parse_pair("[[B]]").outcome) == WIN
    assert parse_pair("[[C]]").outcome == TIE
