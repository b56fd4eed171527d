"""Column names and row statuses, in one place. Rows are joined by `ID`, never by position."""

ID = "id"
INSTRUCTION = "instruction"
INPUT = "input"
OUTPUT = "output"
TEXT_FIELDS = (INSTRUCTION, INPUT, OUTPUT)

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

# Row statuses: every row ends with exactly one of these.
OK = "ok"
PARSE_FAILED = "parse_failed"
REQUEST_FAILED = "request_failed"
INVALID_INPUT = "invalid_input"
STATUSES = (OK, PARSE_FAILED, REQUEST_FAILED, INVALID_INPUT)
