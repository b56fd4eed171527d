"""Column names and row statuses, in one place. Rows are joined by `ID`, never by position."""

ID = "id"
INSTRUCTION = "instruction"
INPUT = "input"
OUTPUT = "output"
TEXT_FIELDS = (INSTRUCTION, INPUT, OUTPUT)
MESSAGES = "messages"  # a conversation's turns: [{"role": ..., "content": ...}, ...]
FORMATTING = "formatting"  # the shape the row came in: alpaca, messages or sharegpt

# Rating results.
SCORE = "score"
SCORE_EXPECTED = "score_expected"
STATUS = "status"
REVIEW = "review"
GRADER = "grader"
DIMENSION = "dimension"
PROMPT_VERSION = "prompt_version"
ATTEMPTS = "attempts"
ERROR = "error"
TOKENS_IN = "tokens_in"
TOKENS_OUT = "tokens_out"
SOURCE = "source"  # "<file>:<line>" or "<file>#<row>" of the row in the input
SUSPECT = "suspect_injection"  # the pattern that flags a row as talking to the grader, or null

# Row statuses: every row ends with exactly one of these.
OK = "ok"
PARSE_FAILED = "parse_failed"
REQUEST_FAILED = "request_failed"
INVALID_INPUT = "invalid_input"
TOO_LONG = "too_long"  # longer than the grader's context: set aside before sending
STATUSES = (OK, PARSE_FAILED, REQUEST_FAILED, INVALID_INPUT, TOO_LONG)
SET_ASIDE = (INVALID_INPUT, TOO_LONG)  # the statuses of rows never sent

# Asks per row: a reply that cannot be read is asked once more, then kept as parse_failed.
MAX_ASKS = 2


def to_ask_again(retry_failed: bool, reask: bool):
    """The rows a pass asks again (a pyarrow filter): request failures (`retry_failed`), replies
    not read on their first ask (`reask`), or both; None for neither."""
    import pyarrow.compute as pc

    wanted = None
    if retry_failed:
        wanted = pc.field(STATUS) == REQUEST_FAILED
    if reask:
        first_ask = (pc.field(STATUS) == PARSE_FAILED) & (pc.field(ATTEMPTS) < MAX_ASKS)
        wanted = first_ask if wanted is None else wanted | first_ask
    return wanted
