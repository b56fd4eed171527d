"""Pairwise judging as in the paper: the judge prompts, reading verdicts, win/tie/lose and the
winning score. Pure functions, no Ray and no I/O.

Each prompt is judged twice, with the candidate's answer first and then second, to cancel the
judge's position bias; the two outcomes combine by the rule of the paper's Sec. 3.3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The paper's App. C (Fig. 23): the Vicuna-blog judge, two scores 1-10 on the first line.
VICUNA_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
VICUNA_USER = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
    "[System]\nWe would like to request your feedback on the performance of two AI assistants in response to "
    "the user question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of "
    "their responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score "
    "indicates better overall performance.\nPlease first output a single line containing only two values "
    "indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the "
    "subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias "
    "and ensuring that the order in which the responses were presented does not affect your judgment.\n\n"
)
# The paper's Table 3 alternative (Zheng et al., 2023): a verdict [[A]], [[B]] or [[C]] for a tie.
PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any positional biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    'possible. After providing your explanation, output your final verdict by strictly following this format: '
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
PAIR_USER = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_1}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_2}\n[The End of Assistant B's Answer]"
)
PROMPTS = {"vicuna": (VICUNA_SYSTEM, VICUNA_USER), "pair": (PAIR_SYSTEM, PAIR_USER)}

WIN, TIE, LOSE = "win", "tie", "lose"


def judge_messages(question: str, first: str, second: str, prompt: str = "vicuna") -> list[dict]:
    """Chat messages asking the judge to compare `first` (Assistant 1 / A) and `second`.

    >>> m = judge_messages("2+2?", "4", "5")
    >>> m[0]["role"], "[The Start of Assistant 1's Answer]\\n4\\n" in m[1]["content"]
    ('system', True)
    >>> "[[C]]" in judge_messages("q", "a", "b", prompt="pair")[0]["content"]
    True
    """
    system, user = PROMPTS[prompt]
    return [{"role": "system", "content": system},
            {"role": "user", "content": user.format(question=question, answer_1=first, answer_2=second)}]


@dataclass(frozen=True)
class Verdict:
    """One judgment, in the judge's own positions: `first` beat, tied or lost to `second`.
    `outcome` is None exactly when `error` says why the reply could not be read."""

    outcome: str | None
    scores: tuple[float, float] | None = None
    error: str | None = None


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_vicuna(reply: str | None) -> Verdict:
    """Two scores 1-10 on the first non-empty line ("8 6", "8.5, 7", "**9 7**").

    >>> parse_vicuna("8 6\\nAssistant 1 is more accurate.")
    Verdict(outcome='win', scores=(8.0, 6.0), error=None)
    >>> parse_vicuna("7.5, 7.5").outcome
    'tie'
    >>> parse_vicuna("Assistant 1 is better.").error
    'no pair of scores on the first line'
    >>> parse_vicuna("11 3").error
    'scores (11.0, 3.0) are outside 1-10'
    """
    lines = [line.strip(" *`") for line in (reply or "").strip().splitlines() if line.strip(" *`")]
    numbers = [float(n) for n in _NUMBER.findall(lines[0])] if lines else []
    if len(numbers) != 2:
        return Verdict(None, error="no pair of scores on the first line" if lines else "empty reply")
    first, second = numbers
    if not (1 <= first <= 10 and 1 <= second <= 10):
        return Verdict(None, error=f"scores {(first, second)} are outside 1-10")
    outcome = WIN if first > second else LOSE if first < second else TIE
    return Verdict(outcome, (first, second))


def parse_pair(reply: str | None) -> Verdict:
    """The last [[A]], [[B]] or [[C]] in the reply ([A] alone is accepted too).

    >>> parse_pair("A is clearer. [[A]]").outcome, parse_pair("Both fine [[C]]").outcome
    ('win', 'tie')
    >>> parse_pair("I prefer neither.").error
    'no verdict [[A]], [[B]] or [[C]]'
    """
    found = re.findall(r"\[\[?([ABC])\]\]?", reply or "")
    if not found:
        return Verdict(None, error="no verdict [[A]], [[B]] or [[C]]")
    return Verdict({"A": WIN, "B": LOSE, "C": TIE}[found[-1]])


PARSERS = {"vicuna": parse_vicuna, "pair": parse_pair}


def flip(outcome: str) -> str:
    """The same judgment seen from the other answer.

    >>> flip("win"), flip("tie")
    ('lose', 'tie')
    """
    return {WIN: LOSE, LOSE: WIN, TIE: TIE}[outcome]


def combine(candidate_first: str, candidate_second: str) -> str:
    """The candidate's final result from its two judgments (answer shown first, then second),
    each already from the candidate's side. The paper's Sec. 3.3: win = wins twice or wins once
    and ties once; tie = ties twice or wins once and loses once; lose = the mirror of win.

    >>> [combine(a, b) for a, b in [("win", "win"), ("win", "tie"), ("tie", "tie"), ("win", "lose"),
    ...                             ("lose", "tie"), ("lose", "lose"), ("tie", "win")]]
    ['win', 'win', 'tie', 'tie', 'lose', 'lose', 'win']
    """
    points = {WIN: 1, TIE: 0, LOSE: -1}
    total = points[candidate_first] + points[candidate_second]
    return WIN if total > 0 else LOSE if total < 0 else TIE


def winning_score(win: int, tie: int, lose: int) -> float:
    """(#win - #lose) / N + 1 with N = win + tie + lose; 1.0 is parity.

    >>> winning_score(94, 71, 15)
    1.4389
    >>> winning_score(0, 5, 0)
    1.0
    """
    n = win + tie + lose
    return round((win - lose) / n + 1, 4) if n else float("nan")


def capacity(candidate_scores: list[float], other_scores: list[float]) -> float:
    """The candidate's "% capacity" of the other model: the sum of its judge scores over the
    other's, over the same judgments (the paper's Fig. 10).

    >>> capacity([8, 9, 7], [9, 9, 9])
    0.8889
    """
    total = sum(other_scores)
    return round(sum(candidate_scores) / total, 4) if total else float("nan")
