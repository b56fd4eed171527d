"""Pairwise judging as in the paper: the judge prompts, reading verdicts, win/tie/lose and the
winning score. Pure functions, no Ray and no I/O.

Each prompt is judged twice, with the candidate's answer first and then second, to cancel the
judge's position bias; the two outcomes combine by the rule of the paper's Sec. 3.3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from alpagasus_ray.rules.prompts import MARKUP, reply_lines

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

# A later turn of a multi-turn prompt (ours, after the two above): each assistant's whole
# conversation with the user, its own earlier answers included; only the answer to the last
# question is judged, with the same instructions and verdict format as the single-turn prompt.
_LAST_ANSWER = ("The two conversations hold the same user questions. Judge only each assistant's answer to the "
                "user's last question; the earlier answers are context.")
VICUNA_TURN_USER = (
    "[The Start of Assistant 1's Conversation with the User]\n{answer_1}\n[The End of Assistant 1's Conversation]\n\n"
    "[The Start of Assistant 2's Conversation with the User]\n{answer_2}\n[The End of Assistant 2's Conversation]\n\n"
    f"[System]\n{_LAST_ANSWER}\n" + VICUNA_USER[VICUNA_USER.index("We would like"):]
)
PAIR_TURN_USER = (
    "[The Start of Assistant A's Conversation with the User]\n{answer_1}\n[The End of Assistant A's Conversation]\n\n"
    "[The Start of Assistant B's Conversation with the User]\n{answer_2}\n[The End of Assistant B's Conversation]\n\n"
    f"{_LAST_ANSWER}"
)
TURN_PROMPTS = {"vicuna": VICUNA_TURN_USER, "pair": PAIR_TURN_USER}

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


def judge_turn_messages(first: list[dict], second: list[dict], prompt: str = "vicuna") -> list[dict]:
    """Chat messages asking the judge to compare two assistants' answers to the last question of
    a multi-turn prompt, each shown in its own conversation (`first`, `second`: the turns, ending
    with the assistant's answer to the last question).

    >>> talk = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
    ...         {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye"}]
    >>> m = judge_turn_messages(talk, talk)
    >>> "### User:\\nBye?\\n\\n### Assistant:\\nBye\\n[The End of Assistant 1's" in m[1]["content"]
    True
    >>> m[1]["content"].count("single line containing only two values")
    1
    """
    system = PROMPTS[prompt][0]
    user = TURN_PROMPTS[prompt].format(answer_1=transcript(first), answer_2=transcript(second))
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def transcript(turns: list[dict]) -> str:
    """A conversation as the judge reads it: each turn under its role's heading."""
    return "\n\n".join(f"### {t['role'].capitalize()}:\n{t['content']}" for t in turns)


@dataclass(frozen=True)
class Verdict:
    """One judgment, in the judge's own positions: `first` beat, tied or lost to `second`.
    `outcome` is None exactly when `error` says why the reply could not be read."""

    outcome: str | None
    scores: tuple[float, float] | None = None
    error: str | None = None


_NUM = r"(\d+(?:\.\d+)?)"
_OF_TEN = r"(?:\s*(?:/|out\s+of)\s*10(?:\.0+)?)?"
_SCORE_WORD = r"(?:an?\s+)?(?:(?:overall|final|total)\s+)?(?:score|rating)"
_NAMED = r"assistant\s*{k}(?:'s)?(?:\s+score)?\s*[:=]?\s*"
# A line that is the two scores and nothing else, with separators, markup and short labels:
# "8 9", "8.5, 7", "Scores: 8 9", "8/10 and 9/10", "Assistant 1: 8, Assistant 2: 9", "(8, 9)".
_PAIR_LINE = re.compile(
    rf"^\(?\s*(?:(?:(?:final|overall)\s+)?(?:scores?|ratings?)\s*[:=]?\s*)?"
    rf"(?:{_NAMED.format(k=1)})?{_NUM}{_OF_TEN}(?:\s*(?:[,;]|\band\b|\bvs\.?)\s*|\s+)"
    rf"(?:{_NAMED.format(k=2)})?{_NUM}{_OF_TEN}\s*\)?\s*\.?$", re.I)
# A label alone on a line, the scores below it: "Scores:".
_LABEL_LINE = re.compile(r"^(?:(?:final|overall)\s+)?(?:scores?|ratings?)\s*:$", re.I)
# An explicitly labelled score anywhere: "Assistant 1: 8", "Score for Assistant 2: 4",
# "Assistant 1 receives a score of 3 because ...", "Assistant 2 gets an 8", "Assistant 1's score is 9/10".
# The number must end a clause, so "Assistant 1: 2 paragraphs are missing" is not a score.
_LABELLED = re.compile(
    rf"(?:\bassistant\s*(?P<a>[12])(?:'s)?(?:\s*\([^)\n]{{0,30}}\))?\s*"
    rf"(?:(?:{_SCORE_WORD})?\s*(?::|=|-|–|\bis\b)|\b(?:receives|gets|earns|deserves|is\s+given|scores|scored|is\s+rated)\b"
    rf"(?:\s+{_SCORE_WORD}\s+of)?(?:\s+an?\b)?)"
    rf"|\b{_SCORE_WORD}\s+(?:for|of)\s+assistant\s*(?P<b>[12])\s*(?::|=|-|–|\bis\b))"
    rf"\s*{_NUM}{_OF_TEN}(?=\s*(?:$|[,.;:)!]|(?:and|because|for|as|since|but|while|out|points?)\b))",
    re.I | re.M)
# The reply ends with a score tuple: "... The output tuple is (10, 1)."
_FINAL_TUPLE = re.compile(rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*\.?$")
_TABLE_SCORE = re.compile(r"^(?:(?:overall|final|total)\s*)?(?:score|rating)?s?$|^(?:overall|total)$", re.I)


def parse_vicuna(reply: str | None) -> Verdict:
    """Two scores 1-10, read only where the judge states them unambiguously.

    A pair is read from (1) a first line that is the two scores and nothing else, (2) scores
    labelled Assistant 1 and Assistant 2 anywhere in the reply, in prose, bold or a markdown
    table, (3) a score tuple that ends the reply. Anything else, or readings that disagree, is
    an explicit failure (and is re-asked).

    >>> parse_vicuna("8 6\\nAssistant 1 is more accurate.")
    Verdict(outcome='win', scores=(8.0, 6.0), error=None)
    >>> parse_vicuna("Scores:\\nAssistant 1: 9\\nAssistant 2: 8").scores
    (9.0, 8.0)
    >>> parse_vicuna("To find f(2), we substitute x=2 into the equation:").error
    'no pair of scores: neither a first line of two scores, nor labelled scores, nor a final tuple'
    >>> parse_vicuna("8 9\\nScore for Assistant 1: 9\\nScore for Assistant 2: 8").error
    'readings disagree: first line (8, 9), labelled scores (9, 8)'
    >>> parse_vicuna("11 3").error
    'scores (11.0, 3.0) are outside 1-10'
    """
    lines = reply_lines(reply)
    if not lines:
        return Verdict(None, error="empty reply")
    readings: dict[str, tuple[float, float]] = {}
    head = lines[1] if _LABEL_LINE.match(lines[0]) and len(lines) > 1 else lines[0]
    if match := _PAIR_LINE.match(head):
        readings["first line"] = (float(match.group(1)), float(match.group(2)))
    labelled, problem = _labelled_scores(lines)
    if problem:
        return Verdict(None, error=problem)
    if labelled:
        readings["labelled scores"] = labelled
    if match := _FINAL_TUPLE.search(lines[-1]):
        readings["final tuple"] = (float(match.group(1)), float(match.group(2)))
    if not readings:
        return Verdict(None, error="no pair of scores: neither a first line of two scores, nor labelled scores, "
                                   "nor a final tuple")
    if len(set(readings.values())) > 1:
        said = ", ".join(f"{source} ({a:g}, {b:g})" for source, (a, b) in readings.items())
        return Verdict(None, error=f"readings disagree: {said}")
    first, second = next(iter(readings.values()))
    if not (1 <= first <= 10 and 1 <= second <= 10):
        return Verdict(None, error=f"scores {(first, second)} are outside 1-10")
    outcome = WIN if first > second else LOSE if first < second else TIE
    return Verdict(outcome, (first, second))


def _labelled_scores(lines: list[str]) -> tuple[tuple[float, float] | None, str | None]:
    """The scores given to Assistant 1 and 2 by label, in prose or a table; an error when an
    assistant is given two different scores."""
    given: dict[str, set[float]] = {"1": set(), "2": set()}
    for match in _LABELLED.finditer("\n".join(lines)):
        given[match.group("a") or match.group("b")].add(float(match.group(3)))
    for assistant, score in _table_scores(lines):
        given[assistant].add(score)
    for assistant, scores in given.items():
        if len(scores) > 1:
            return None, f"Assistant {assistant} is given different scores: {', '.join(f'{s:g}' for s in sorted(scores))}"
    if given["1"] and given["2"]:
        return (given["1"].pop(), given["2"].pop()), None
    return None, None


def _table_scores(lines: list[str]) -> list[tuple[str, float]]:
    """(assistant, score) from markdown tables: a row per assistant ("| Assistant 1 | 8 |", or a
    score column among criteria), or a column per assistant with a score/overall row."""
    found = []
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    table = [row for row in table if not all(set(cell) <= set("-: ") for cell in row)]  # drop |---|---|
    if not table:
        return found
    header = [cell.lower() for cell in table[0]]
    named_columns = {k: header.index(f"assistant {k}") for k in "12" if f"assistant {k}" in header}
    score_column = next((i for i, cell in enumerate(header) if i and _TABLE_SCORE.match(cell)), None)
    for row in table[1:]:
        label = row[0].lower()
        if len(named_columns) == 2 and _TABLE_SCORE.match(label):
            found += [(k, float(row[i])) for k, i in named_columns.items() if i < len(row) and _is_number(row[i])]
        elif (m := re.fullmatch(r"assistant\s*([12])", label)) and (len(row) == 2 or score_column is not None):
            cell = row[1] if len(row) == 2 else row[score_column] if score_column < len(row) else ""
            cell = re.sub(r"\s*(?:/|out\s+of)\s*10$", "", cell)
            if _is_number(cell):
                found.append((m.group(1), float(cell)))
    return found


def _is_number(text: str) -> bool:
    return re.fullmatch(r"\d+(?:\.\d+)?", text) is not None


_TAGS = re.compile(r"\[\[([ABC])\]\]")
_SINGLE_TAGS = re.compile(r"\[([ABC])\]")
# Forms in which a judge states its verdict when the reply holds more than one tag.
_STATED = (
    re.compile(r"verdict\W{0,3}(?:is\W{0,3})?\[\[([ABC])\]\]", re.I),     # Final verdict: [[A]]
    re.compile(r"\[\[([ABC])\]\]\s+is\s+(?:\w+\s+)?better\s+than\s+\[\[[ABC]\]\]", re.I),
    re.compile(r"\[\[[ABC]\]\]\s+is\s+(?:\w+\s+)?worse\s+than\s+\[\[([ABC])\]\]", re.I),
)


def parse_pair(reply: str | None) -> Verdict:
    """The verdict [[A]], [[B]] or [[C]] (a tie) that the judge states.

    One tag, however often repeated, is the verdict. With different tags the reply must state
    which is its verdict ("Final verdict: [[A]]", "[[B]] is better than [[A]]", or a last line
    that is the tag alone); otherwise it fails explicitly. Single brackets count when there are
    no double ones.

    >>> parse_pair("A is clearer. [[A]]").outcome, parse_pair("Both fine [[C]]").outcome
    ('win', 'tie')
    >>> parse_pair("Final verdict: [[B]] is better than [[A]] because it is shorter.").outcome
    'lose'
    >>> parse_pair("Either [[A]] or [[B]] could be argued.").error
    'different verdicts [[A]], [[B]] and none stated as final'
    >>> parse_pair("I prefer neither.").error
    'no verdict [[A]], [[B]] or [[C]]'
    """
    text = MARKUP.sub("", reply or "")
    tags = _TAGS.findall(text) or _SINGLE_TAGS.findall(text)
    if not tags:
        return Verdict(None, error="no verdict [[A]], [[B]] or [[C]]")
    distinct = sorted(set(tags))
    if len(distinct) > 1:
        stated = {m.group(1) for pattern in _STATED for m in pattern.finditer(text)}
        last = text.strip().splitlines()[-1].strip(" .")
        if re.fullmatch(r"\[\[[ABC]\]\]", last):
            stated.add(last[2])
        if len(stated) != 1:
            return Verdict(None, error=f"different verdicts {', '.join(f'[[{t}]]' for t in distinct)} and "
                                       + ("none stated as final" if not stated else "stated verdicts disagree"))
        distinct = sorted(stated)
    return Verdict({"A": WIN, "B": LOSE, "C": TIE}[distinct[0]])


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
