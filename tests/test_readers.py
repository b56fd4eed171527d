"""The reply readers on the shapes real graders and judges write: each reply gives the verdict the
judge stated or an explicit failure (which is re-asked), never another verdict.

Every reply below was written for this test; the shapes follow what GPT-3.5 / GPT-4 judges write
on the paper's prompts, including the traps that once read as verdicts nobody gave.
"""

import pytest

from alpagasus_ray.rules.judging import LOSE, TIE, WIN, parse_pair, parse_vicuna
from alpagasus_ray.rules.prompts import parse_score

FAIL = None  # an explicit failure: no verdict, and an error that says why

# (reply, the scores the judge stated for Assistant 1 and 2, or FAIL)
VICUNA = [
    # the prompt's own format, and its usual variants
    ("8 9\nAssistant 2 is more detailed.", (8, 9)),
    ("8.5, 7\nBoth are fine.", (8.5, 7)),
    ("**9 7**\n\nAssistant 1 is precise.", (9, 7)),
    ("Scores: 8 9", (8, 9)),
    ("Score: 6 and 6.", (6, 6)),
    ("Assistant 1: 8, Assistant 2: 9", (8, 9)),
    ("8/10 and 9/10\nAssistant 2 explains more.", (8, 9)),
    ("(7, 4)\nAssistant 1 answers the question.", (7, 4)),
    ("10 10\nBoth are perfect.", (10, 10)),
    ("  \n\n7 3\nThe first is right.", (7, 3)),
    ("`9 6`", (9, 6)),
    ("Scores:\n8 5\nAssistant 1 is correct.", (8, 5)),
    # labelled scores, on other lines, in prose, in bold
    ("Scores:\nAssistant 1: 9\nAssistant 2: 8", (9, 8)),
    ("Score for Assistant 1: 2\nScore for Assistant 2: 4\nAssistant 2 is right.", (2, 4)),
    ("Assistant 1 receives a score of 3 because the sum is wrong. Assistant 2 receives a score of 10 for a "
     "complete answer.", (3, 10)),
    ("**Assistant 1:** 9\n**Assistant 2:** 8", (9, 8)),
    ("Assistant 1's score is 9/10 and Assistant 2's score is 7/10.", (9, 7)),
    ("Assistant 2: 9, Assistant 1: 8", (8, 9)),
    ("Assistant 1 (the first answer): 6\nAssistant 2 (the second answer): 8", (6, 8)),
    ("Both explain recursion. Assistant 1 gets a 7 because it has no example, Assistant 2 gets an 8.", (7, 8)),
    ("9 8\nAssistant 1: 9\nAssistant 2: 8", (9, 8)),  # two readings that agree
    ("Assistant 1 scored 5 out of 10 and Assistant 2 scored 8 out of 10.", (5, 8)),
    # markdown tables
    ("| Assistant | Score |\n|---|---|\n| Assistant 1 | 8 |\n| Assistant 2 | 6 |", (8, 6)),
    ("| Criterion | Assistant 1 | Assistant 2 |\n|---|---|---|\n| Helpfulness | 8 | 9 |\n| Overall | 7.5 | 9 |", (7.5, 9)),
    ("| | Helpfulness | Overall |\n|---|---|---|\n| Assistant 1 | 8 | 9 |\n| Assistant 2 | 7 | 7 |", (9, 7)),
    ("| Assistant | Score |\n|:-:|:-:|\n| **Assistant 1** | **6/10** |\n| **Assistant 2** | **9/10** |", (6, 9)),
    # a final tuple
    ("Assistant 1 is concise, Assistant 2 rambles.\nThe output tuple is (10, 1).", (10, 1)),
    ("Both are correct, but the second has a typo.\n(9, 8)", (9, 8)),
    # traps: numbers that are not scores
    ("To find f(2), we substitute x=2 into the equation:\nf(2) = 4 + 2 = 6", FAIL),
    ("I am sorry, but Assistant 1 and Assistant 2 gave the same code.", FAIL),
    ("Assistant 1: 2 paragraphs are missing. Assistant 2: 3 steps are wrong.", FAIL),
    ("In 2019, 3 of the claims were checked.", FAIL),
    ("7-8 9", FAIL),  # a range
    ("4 5 6", FAIL),  # three numbers
    ("9\n8", FAIL),  # one number a line, unlabelled
    ("Assistant 1 is better.", FAIL),
    ("I cannot evaluate these answers.", FAIL),  # a refusal
    ("", FAIL),
    ("11 3", FAIL),  # outside 1-10
    ("0 5", FAIL),
    ("| | Helpfulness | Accuracy |\n|---|---|---|\n| Assistant 1 | 8 | 9 |\n| Assistant 2 | 7 | 7 |", FAIL),  # no overall
    # readings that disagree
    ("9 8\nAssistant 1: 8\nAssistant 2: 9", FAIL),
    ("8 9\nScore for Assistant 1: 9\nScore for Assistant 2: 8", FAIL),
    ("Assistant 1: 8\nAssistant 2: 9\nHelpfulness - Assistant 1: 7", FAIL),  # Assistant 1 given two scores
    ("8 6\nOn balance the tuple is (6, 8).", FAIL),
]

# (reply, the verdict the judge stated from Assistant A's side, or FAIL)
PAIR = [
    ("Assistant A is clearer.\n\n[[A]]", WIN),
    ("Assistant B answers the question directly. [[B]]", LOSE),
    ("Both are equally good. [[C]]", TIE),
    ("**[[A]]**", WIN),
    ("Final verdict: [[C]]", TIE),
    ("[[B]]\nBecause B explains the steps.", LOSE),
    ("A is better. [[A]] Again: [[A]].", WIN),
    ("[A]", WIN),  # single brackets when there are no double ones
    ("My verdict: [B]", LOSE),
    ("Final verdict: [[B]] is better than [[A]] because it is shorter.", LOSE),
    ("[[B]] is better than [[A]].", LOSE),
    ("[[B]] is clearly better than [[A]].", LOSE),
    ("[[A]] is worse than [[B]].", LOSE),
    ("[[A]] is slightly worse than [[B]], so [[B]].", LOSE),
    ("Final verdict: [[A]]. Note that [[B]] misses the second part.", WIN),
    ("The verdict is [[C]] though [[A]] was close.", TIE),
    ("Between [[A]] and [[B]], the first is more accurate.\n[[A]]", WIN),
    ("At first [[B]] looks better, but it has an error.\n\n**Final verdict: [[A]]**", WIN),
    ("My final verdict is [[A]]; [[C]] would be wrong since B errs.", WIN),
    ("Compared to [[A]], I choose:\n[[B]]", LOSE),
    ("Assistant A is better.\n\nFinal Verdict: [[A]]", WIN),
    ("[[C]]\n\nBoth responses are equally helpful.", TIE),
    ("Verdict - [[B]]", LOSE),
    ("Both fail; [[C]].", TIE),
    ("The answer [[A]] is better than [[B]] here.", WIN),
    ("[[A]]\n[[A]]", WIN),
    ("Assistant B wins: [[B]].", LOSE),
    ("After weighing both, [[C]]", TIE),
    ("Final verdict:\n[[B]]", LOSE),
    ("I pick [[B]].", LOSE),
    # traps: several tags, none stated as the verdict, or stated twice differently
    ("Either [[A]] or [[B]] could be argued.", FAIL),
    ("[[A]] [[B]]", FAIL),
    ("If A were complete it would be [[A]]; as it is, B gets [[B]] or [[C]].", FAIL),
    ("Final verdict: [[A]]. Final verdict: [[B]].", FAIL),
    ("[[A]] is better than [[B]]. Final verdict: [[B]]", FAIL),
    ("The [[A]] answer and the [[B]] answer differ.\nNeither is clearly better.", FAIL),
    # no verdict at all
    ("I prefer neither.", FAIL),
    ("Assistant A is better.", FAIL),
    ("", FAIL),
    ("[[D]]", FAIL),
    ("I'm sorry, I can't judge these responses.", FAIL),
]

# (reply, the score the grader stated on the 0-5 scale, or FAIL)
RATING = [
    ("4.5\nThe answer is correct.", 4.5),
    ("5", 5),
    ("0\nThe response is unrelated.", 0),
    ("Score: 4.5", 4.5),
    ("Score: 4.\nFine.", 4),
    ("4.5/5", 4.5),
    ("**4**\nAccurate.", 4),
    ("Score: **4.5**", 4.5),
    ("Accuracy: 3.5 out of 5.\nMostly right.", 3.5),
    ("4.5 out of 5", 4.5),
    ("Score: 3.5/5.0", 3.5),
    ("Rating = 2", 2),
    ("Accuracy - 4.5.", 4.5),
    ("My score is 3", 3),
    ("Score:\n4\nThe response is accurate.", 4),
    ("## Score\n4", 4),
    ("Rating the response on a 0-5 scale:\nScore: 4", 4),  # announced on a later line
    ("The response is accurate but terse.\nScore: 4", 4),
    ("4.5 - mostly accurate, one detail is off.", 4.5),
    ("4 The response follows the instruction.", 4),
    ("4/5: good, but misses one case.", 4),
    ("I would rate this response 2 out of 5 because it is vague.", 2),
    ("I give it 4/5.", 4),
    ("The response deserves a score of 4 because it is right.", 4),
    ("3\n\nThe answer gets 2 of 3 facts right.", 3),
    ("5\nScore: 5", 5),  # two readings that agree
    ("Overall score: 4\nAccuracy: 4", 4),
    # traps: numbers that are not a score
    ("The response has 2 paragraphs.", FAIL),
    ("Rating the response on a 0-5 scale:", FAIL),
    ("Rating the response on a 0-5 scale:\nThe response is accurate.", FAIL),
    ("2 paragraphs are missing.", FAIL),
    ("The response gets 3 out of 5 steps right.", FAIL),
    ("1. The response is right.\n2. It is short.", FAIL),  # a numbered list
    ("The response lists 3 of 5 steps.", FAIL),
    ("I'd give it a 4.", FAIL),  # no score word, no scale: not stated plainly enough
    # out of 10 on a 0-5 scale
    ("8 out of 10", FAIL),
    ("8/10\nGood.", FAIL),
    ("Score: 9/10", FAIL),
    # ranges and two scores
    ("4-5", FAIL),
    ("4 - 5", FAIL),
    ("4 or 5", FAIL),
    ("Score: 4-5", FAIL),
    ("4 5", FAIL),
    ("4\nOn reflection, Score: 3", FAIL),
    ("Accuracy: 4\nHelpfulness: 3", FAIL),
    ("I would rate this response 2 out of 5 because it is vague, and 3/5 for style.", FAIL),
    # out of range, refusals, nothing
    ("7\nGreat!", FAIL),
    ("-1", FAIL),
    ("I'm sorry, I cannot rate this.", FAIL),
    ("", FAIL),
    (None, FAIL),
]


def test_each_table_covers_at_least_40_shapes():
    assert len(VICUNA) >= 40 and len(PAIR) >= 40 and len(RATING) >= 40
    assert len({r for r, _ in VICUNA}) == len(VICUNA) and len({r for r, _ in PAIR}) == len(PAIR)


@pytest.mark.parametrize("reply,stated", VICUNA)
def test_vicuna_reader_gives_the_stated_scores_or_fails(reply, stated):
    verdict = parse_vicuna(reply)
    if stated is FAIL:
        assert verdict.outcome is None and verdict.scores is None and verdict.error
    else:
        first, second = stated
        assert verdict.error is None and verdict.scores == (first, second)
        assert verdict.outcome == (WIN if first > second else LOSE if first < second else TIE)


@pytest.mark.parametrize("reply,stated", PAIR)
def test_pair_reader_gives_the_stated_verdict_or_fails(reply, stated):
    verdict = parse_pair(reply)
    if stated is FAIL:
        assert verdict.outcome is None and verdict.error
    else:
        assert verdict.error is None and verdict.outcome == stated


@pytest.mark.parametrize("reply,stated", RATING)
def test_rating_reader_gives_the_stated_score_or_fails(reply, stated):
    parsed = parse_score(reply)
    if stated is FAIL:
        assert parsed.score is None and parsed.error
    else:
        assert parsed.error is None and parsed.score == stated


def test_failures_say_why():
    assert parse_vicuna("9 8\nAssistant 1: 8\nAssistant 2: 9").error == \
        "readings disagree: first line (9, 8), labelled scores (8, 9)"
    assert parse_vicuna("Assistant 1: 8\nAssistant 2: 9\nHelpfulness - Assistant 1: 7").error == \
        "Assistant 1 is given different scores: 7, 8"
    assert parse_pair("Either [[A]] or [[B]] could be argued.").error == \
        "different verdicts [[A]], [[B]] and none stated as final"
    assert parse_score("Score: 9/10").error == "score given out of 10, not on the 0-5 scale"
    assert parse_score("4\nOn reflection, Score: 3").error == "two different scores: 3, 4"
