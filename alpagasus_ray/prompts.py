"""The grader prompt of the AlpaGasus paper (Fig. 4) and the parsing of what graders answer.

Pure functions, no Ray and no I/O: the rating backends call them on every row.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Bump when the text of the prompt changes, so ratings made with different prompts are never mixed.
PROMPT_VERSION = "alpagasus-fig4-v1"

RATING_SYSTEM = (
    "We would like to request your feedback on the performance of AI assistant in response to the "
    "instruction and the given input displayed following.\n\n"
    "Instruction: {instruction}\n\n"
    "Input: {input}\n\n"
    "Response: {output}"
)
RATING_USER = (
    "Please rate according to the {dimension} of the response to the instruction and the input. "
    "Each assistant receives a score on a scale of 0 to 5, where a higher score indicates higher "
    "level of the {dimension}. Please first output a single line containing the value indicating "
    "the scores. In the subsequent line, please provide a comprehensive explanation of your "
    "evaluation, avoiding any potential bias."
)

SCORE_MIN, SCORE_MAX = 0.0, 5.0
# The values a constrained grader may emit: the paper's 0.5 steps.
SCORE_CHOICES = tuple(f"{v / 2:g}" for v in range(int(SCORE_MAX * 2) + 1))


def rating_messages(instruction: str, input: str, output: str, dimension: str = "accuracy") -> list[dict]:
    """Chat messages asking a grader to score one (instruction, input, response) triple.

    The triple sits in the system message and the request in the user message, as in Fig. 4.

    >>> msgs = rating_messages("Add 2 and 2.", "", "4", dimension="accuracy")
    >>> [m["role"] for m in msgs]
    ['system', 'user']
    >>> "Instruction: Add 2 and 2.\\n\\nInput: \\n\\nResponse: 4" in msgs[0]["content"]
    True
    >>> msgs[1]["content"].count("accuracy")
    2
    """
    return [
        {"role": "system", "content": RATING_SYSTEM.format(instruction=instruction, input=input, output=output)},
        {"role": "user", "content": RATING_USER.format(dimension=dimension)},
    ]


CHARS_PER_TOKEN = 4  # English text under common BPE vocabularies


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token estimate (about 4 characters a token for English BPE vocabularies).

    >>> estimate_tokens("")
    0
    >>> estimate_tokens("abcdefghi")
    3
    """
    return math.ceil(len(text) / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class ParsedScore:
    """A grader's reply, parsed: `score` is None exactly when `error` says why."""

    score: float | None
    review: str
    error: str | None = None


_NUMBER = r"(\d+(?:\.\d+)?)"
_OUT_OF = r"\s*(?:/|out\s+of)\s*5(?:\.0+)?"
# A line that is only a score: "4.5", "4.5/5", "4 out of 5", "Score: 4", "Accuracy - 4.5."
_SCORE_LINE = re.compile(rf"^(?:[A-Za-z ]{{0,30}}?\s*[:=-]\s*)?{_NUMBER}(?:{_OUT_OF})?\s*\.?$", re.I)
# A score that starts a longer first line: "4.5 The response is ..." / "4/5 - good".
_LEADING_SCORE = re.compile(rf"^{_NUMBER}(?:{_OUT_OF})?(?:\s*[-:,.;)]\s*|\s+)(?=\D)", re.I)
# "... I would rate it 4 out of 5 ..." anywhere on the first line.
_RATED_OUT_OF = re.compile(rf"{_NUMBER}{_OUT_OF}", re.I)
_MARKUP = re.compile(r"[*_`#>]+")


def parse_score(reply: str | None, low: float = SCORE_MIN, high: float = SCORE_MAX) -> ParsedScore:
    """Read the score from the first non-empty line of a grader's reply; the rest is the review.

    Accepts what graders write in practice and fails explicitly on anything else.

    >>> parse_score("4.5\\nThe answer is correct.")
    ParsedScore(score=4.5, review='The answer is correct.', error=None)
    >>> parse_score("Score: 4").score, parse_score("4.5/5").score, parse_score("**4**").score
    (4.0, 4.5, 4.0)
    >>> parse_score("Accuracy: 3.5 out of 5.\\nMostly right.").score
    3.5
    >>> parse_score("4 The response follows the instruction.").score
    4.0
    >>> parse_score("Score:\\n5\\nPerfect.")
    ParsedScore(score=5.0, review='Perfect.', error=None)
    >>> parse_score("I would rate this response 2 out of 5 because it is vague.").score
    2.0
    >>> parse_score("7\\nGreat!").error
    'score 7 is outside 0-5'
    >>> parse_score("The response is good.").error
    'no score on the first line'
    >>> parse_score("").error
    'empty reply'
    """
    lines = [line.strip() for line in (reply or "").strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ParsedScore(None, "", "empty reply")
    first = _MARKUP.sub("", lines[0]).strip()
    rest = lines[1:]
    if re.fullmatch(r"[A-Za-z ]{1,30}:", first) and rest:
        # A label alone on the first line ("Score:"), the value on the next.
        first, rest = _MARKUP.sub("", rest[0]).strip(), rest[1:]
    match = _SCORE_LINE.match(first) or _LEADING_SCORE.match(first) or _RATED_OUT_OF.search(first)
    review = "\n".join(rest)
    if match is None:
        return ParsedScore(None, "\n".join(lines), "no score on the first line")
    if not _SCORE_LINE.match(first):
        review = "\n".join(lines)
    value = float(match.group(1))
    if not low <= value <= high:
        return ParsedScore(None, review, f"score {match.group(1)} is outside {low:g}-{high:g}")
    return ParsedScore(value, review)


def expected_score(top_logprobs: list[list[tuple[str, float]]], high: float = SCORE_MAX) -> float | None:
    """The probability-weighted score from the grader's top logprobs, finer than its 0.5 steps.

    `top_logprobs` holds one list per generated token, each a list of (token, logprob) with the
    chosen token first. The integer part comes from the first token that is a digit: its
    alternatives that are integers in range give a distribution over 0..5. The half step comes
    from the next position: the share of its probability on a token starting with "." (as in
    "4" "." "5"); it applies to every integer below the top of the scale. Returns None when no
    digit token is found.

    >>> import math
    >>> first = [("4", math.log(0.6)), ("5", math.log(0.3)), ("3", math.log(0.1))]
    >>> second = [(".", math.log(0.5)), ("\\n", math.log(0.5))]
    >>> expected_score([first, second])  # .6*4.25 + .3*5 + .1*3.25
    4.375
    >>> expected_score([[("Score", 0.0)], [(":", 0.0)], [(" 5", 0.0), (" 4", math.log(1e-9))]])
    5.0
    >>> expected_score([[("Good", 0.0)]]) is None
    True
    """
    for i, position in enumerate(top_logprobs):
        if not position or _as_score(position[0][0], high) is None:
            continue
        mass: dict[float, float] = {}
        for token, logprob in position:
            value = _as_score(token, high)
            if value is not None:
                mass[value] = mass.get(value, 0.0) + math.exp(logprob)
        total = sum(mass.values())
        half = 0.0
        if i + 1 < len(top_logprobs) and top_logprobs[i + 1]:
            after = top_logprobs[i + 1]
            after_total = sum(math.exp(lp) for _, lp in after)
            dotted = sum(math.exp(lp) for tok, lp in after if tok.strip().startswith("."))
            half = dotted / after_total if after_total > 0 else 0.0
        value = sum(p * (v + (0.5 * half if v < high else 0.0)) for v, p in mass.items()) / total
        return round(value, 4)
    return None


def _as_score(token: str, high: float) -> float | None:
    """The integer a token stands for when it is a whole number within 0..high, else None."""
    token = token.strip().strip("*")
    if token.isdigit() and int(token) <= high:
        return float(token)
    return None
