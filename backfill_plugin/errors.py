"""Backfill failures the operator can act on (one line each, like every migrate error)."""
from migrator.errors import MigrateError, error_code, one_line  # noqa: F401 - re-exported

# ClickHouse errors in the SQL itself: the same SQL fails the same way on every retry, so retrying
# only delays the one line the author needs (codes from the engine's src/Common/ErrorCodes.cpp).
PERMANENT_CODES = {
    1: "UNSUPPORTED_METHOD", 8: "THERE_IS_NO_COLUMN", 10: "NOT_FOUND_COLUMN_IN_BLOCK",
    16: "NO_SUCH_COLUMN_IN_TABLE", 20: "NUMBER_OF_COLUMNS_DOESNT_MATCH", 34: "TOO_MANY_ARGUMENTS_FOR_FUNCTION", 35: "TOO_FEW_ARGUMENTS_FOR_FUNCTION",
    36: "BAD_ARGUMENTS", 42: "NUMBER_OF_ARGUMENTS_DOESNT_MATCH", 43: "ILLEGAL_TYPE_OF_ARGUMENT",
    44: "ILLEGAL_COLUMN", 46: "UNKNOWN_FUNCTION", 47: "UNKNOWN_IDENTIFIER", 48: "NOT_IMPLEMENTED",
    53: "TYPE_MISMATCH", 60: "UNKNOWN_TABLE", 62: "SYNTAX_ERROR", 63: "UNKNOWN_AGGREGATE_FUNCTION",
    70: "CANNOT_CONVERT_TYPE", 81: "UNKNOWN_DATABASE", 115: "UNKNOWN_SETTING", 179: "MULTIPLE_EXPRESSIONS_FOR_ALIAS",
    184: "ILLEGAL_AGGREGATION", 215: "NOT_AN_AGGREGATE", 352: "AMBIGUOUS_COLUMN_NAME",
    386: "NO_COMMON_TYPE", 456: "UNKNOWN_QUERY_PARAMETER", 457: "BAD_QUERY_PARAMETER",
    # A value of this range that the SQL cannot convert: the same rows fail the same way on a retry.
    6: "CANNOT_PARSE_TEXT", 27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED", 38: "CANNOT_PARSE_DATE",
    41: "CANNOT_PARSE_DATETIME", 72: "CANNOT_PARSE_NUMBER", 190: "SIZES_OF_ARRAYS_DONT_MATCH",
    321: "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
}


def is_permanent(exc: BaseException) -> bool:
    """An error in the SQL, not in the moment: no retry can succeed."""
    return error_code(exc) in PERMANENT_CODES


class BackfillError(MigrateError):
    """A backfill cannot start or go on; the message says what to do."""


class LeaseLost(BackfillError):
    """Another runner took the backfill over: this one must stop without writing its state."""
