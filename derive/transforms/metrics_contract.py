"""Row validation of the adapter contract's ``FetchMetricsOutput.rows`` (SPEC §3).

The reader (``derive.io.metrics``) turns each JSON row into one frame row that keeps every field's
JSON type next to its text, so wrong JSON types (a number where a string belongs) are rejected here
with a reason instead of being coerced. A row is valid when no rule below applies; a rejected row
keeps its object and row number and every reason that applies, so one pass reports everything.
"""

from __future__ import annotations

import polars as pl

TS = pl.Datetime("us", "UTC")

#: Fields of one ``SurfaceMetricRow`` as the contract names them.
ROW_FIELDS: tuple[str, ...] = (
    "metric_kind",
    "window_start",
    "window_end",
    "value_numeric",
    "value_text",
    "currency",
    "payload_jsonb",
)

#: JSON type tags the reader writes into ``<field>_type``. ``nonfinite`` is NaN/Infinity, which
#: Python's decoder accepts but JSON does not.
JSON_TYPES: tuple[str, ...] = (
    "absent",
    "null",
    "string",
    "number",
    "boolean",
    "object",
    "array",
    "nonfinite",
)

#: The raw rows as read: ``object`` and ``row`` are 1-based; per field its JSON type and its text
#: (the string itself for strings, the exact JSON text for numbers, objects and arrays).
RAW_ROWS = pl.Schema(
    {
        "object": pl.Int32(),
        "row": pl.Int32(),
        "is_object": pl.Boolean(),
        **{c: t for f in ROW_FIELDS for c, t in ((f"{f}_type", pl.String()), (f, pl.String()))},
    }
)

#: Valid rows, typed: ``value_numeric`` stays the exact decimal text (PostgreSQL casts it to
#: numeric(18,4)), ``payload_jsonb`` the JSON text.
VALID_ROWS = pl.Schema(
    {
        "object": pl.Int32(),
        "row": pl.Int32(),
        "metric_kind": pl.String(),
        "window_start": TS,
        "window_end": TS,
        "value_numeric": pl.String(),
        "value_text": pl.String(),
        "currency": pl.String(),
        "payload_jsonb": pl.String(),
    }
)

#: Rejected rows: every reason that applies, and one message naming the offending values.
REJECTED_ROWS = pl.Schema(
    {
        "object": pl.Int32(),
        "row": pl.Int32(),
        "reasons": pl.List(pl.String()),
        "detail": pl.String(),
    }
)

#: Rejection reasons, in the order they are reported.
REASONS: tuple[str, ...] = (
    "not_an_object",
    "unknown_metric_kind",
    "bad_window_start",
    "bad_window_end",
    "window_not_increasing",
    "bad_value_numeric",
    "bad_value_text",
    "no_value",
    "bad_currency",
    "missing_currency",
    "nul_character",
    "duplicate_row",
)

#: A JSON text's escaped NUL (``\u0000`` after an even number of backslashes): PostgreSQL's jsonb
#: and text cannot hold U+0000.
_JSON_NUL = r"(?:^|[^\\])(?:\\\\)*\\u0000"

#: numeric(18,4) holds magnitudes below 10^14.
MAX_ABS_VALUE = 1e14

#: Active ISO-4217 codes (funds and precious-metal codes included; XTS and XXX are not currencies).
ISO_4217: frozenset[str] = frozenset(
    [
        "AED",
        "AFN",
        "ALL",
        "AMD",
        "ANG",
        "AOA",
        "ARS",
        "AUD",
        "AWG",
        "AZN",
        "BAM",
        "BBD",
        "BDT",
        "BGN",
        "BHD",
        "BIF",
        "BMD",
        "BND",
        "BOB",
        "BOV",
        "BRL",
        "BSD",
        "BTN",
        "BWP",
        "BYN",
        "BZD",
        "CAD",
        "CDF",
        "CHE",
        "CHF",
        "CHW",
        "CLF",
        "CLP",
        "CNY",
        "COP",
        "COU",
        "CRC",
        "CUC",
        "CUP",
        "CVE",
        "CZK",
        "DJF",
        "DKK",
        "DOP",
        "DZD",
        "EGP",
        "ERN",
        "ETB",
        "EUR",
        "FJD",
        "FKP",
        "GBP",
        "GEL",
        "GHS",
        "GIP",
        "GMD",
        "GNF",
        "GTQ",
        "GYD",
        "HKD",
        "HNL",
        "HTG",
        "HUF",
        "IDR",
        "ILS",
        "INR",
        "IQD",
        "IRR",
        "ISK",
        "JMD",
        "JOD",
        "JPY",
        "KES",
        "KGS",
        "KHR",
        "KMF",
        "KPW",
        "KRW",
        "KWD",
        "KYD",
        "KZT",
        "LAK",
        "LBP",
        "LKR",
        "LRD",
        "LSL",
        "LYD",
        "MAD",
        "MDL",
        "MGA",
        "MKD",
        "MMK",
        "MNT",
        "MOP",
        "MRU",
        "MUR",
        "MVR",
        "MWK",
        "MXN",
        "MXV",
        "MYR",
        "MZN",
        "NAD",
        "NGN",
        "NIO",
        "NOK",
        "NPR",
        "NZD",
        "OMR",
        "PAB",
        "PEN",
        "PGK",
        "PHP",
        "PKR",
        "PLN",
        "PYG",
        "QAR",
        "RON",
        "RSD",
        "RUB",
        "RWF",
        "SAR",
        "SBD",
        "SCR",
        "SDG",
        "SEK",
        "SGD",
        "SHP",
        "SLE",
        "SLL",
        "SOS",
        "SRD",
        "SSP",
        "STN",
        "SVC",
        "SYP",
        "SZL",
        "THB",
        "TJS",
        "TMT",
        "TND",
        "TOP",
        "TRY",
        "TTD",
        "TWD",
        "TZS",
        "UAH",
        "UGX",
        "USD",
        "USN",
        "UYI",
        "UYU",
        "UYW",
        "UZS",
        "VED",
        "VES",
        "VND",
        "VUV",
        "WST",
        "XAF",
        "XAG",
        "XAU",
        "XBA",
        "XBB",
        "XBC",
        "XBD",
        "XCD",
        "XCG",
        "XDR",
        "XOF",
        "XPD",
        "XPF",
        "XPT",
        "XSU",
        "XUA",
        "YER",
        "ZAR",
        "ZMW",
        "ZWG",
        "ZWL",
    ]
)

# Accepted timestamp forms: date-time with Z or an offset, date-time without zone (taken as UTC,
# like --as-of), or a bare date (midnight UTC).
_ZONED = "%Y-%m-%dT%H:%M:%S%.f%:z"
_NAIVE = "%Y-%m-%dT%H:%M:%S%.f"
_DATE = "%Y-%m-%d"
_TIMESTAMP_SHAPE = r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2}(\.\d{1,6})?([zZ]|[+-]\d{2}:\d{2})?)?$"


def _typ(field: str) -> pl.Expr:
    return pl.col(f"{field}_type")


def _given(field: str) -> pl.Expr:
    """The field is present and not JSON null."""
    return ~_typ(field).is_in(["absent", "null"])


def _shown(field: str) -> pl.Expr:
    """The offending value for messages: quoted text, JSON text, or what is missing."""
    return (
        pl.when(_typ(field) == "string")
        .then(pl.format('"{}"', pl.col(field)))
        .when(_typ(field) == "absent")
        .then(pl.lit("(missing)"))
        .otherwise(pl.coalesce(pl.col(field), _typ(field)))
    )


def parse_timestamp(text: pl.Expr) -> pl.Expr:
    """ISO-8601 text -> UTC timestamp (null when malformed or out of range)."""
    shaped = pl.when(text.str.contains(_TIMESTAMP_SHAPE)).then(text.str.replace(r"[zZ]$", "+00:00"))
    return pl.coalesce(
        shaped.str.to_datetime(_ZONED, strict=False, time_unit="us").dt.convert_time_zone("UTC"),
        shaped.str.to_datetime(_NAIVE, strict=False, time_unit="us").dt.replace_time_zone("UTC"),
        shaped.str.to_datetime(_DATE, strict=False, time_unit="us").dt.replace_time_zone("UTC"),
    )


def _timestamp(field: str) -> pl.Expr:
    return pl.when(_typ(field) == "string").then(parse_timestamp(pl.col(field)))


def validate_metric_rows(
    raw: pl.LazyFrame, /, *, kinds: tuple[str, ...], monetary_kinds: tuple[str, ...]
) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """Split raw ``FetchMetricsOutput`` rows into valid rows and rejected rows with reasons.

    Args:
        raw: rows shaped as :data:`RAW_ROWS`.
        kinds: the accepted metric kinds (from the rules file).
        monetary_kinds: kinds that need an ISO-4217 currency.

    Returns:
        ``(valid, rejected)`` shaped as :data:`VALID_ROWS` and :data:`REJECTED_ROWS`, sorted by
        ``(object, row)``. A later row repeating an earlier valid row's (metric_kind, window) in the
        same object is rejected as ``duplicate_row``: an adapter reports one value per window.
    """
    start, end = _timestamp("window_start"), _timestamp("window_end")
    number = pl.col("value_numeric").cast(pl.Float64, strict=False)
    kind_ok = (_typ("metric_kind") == "string") & pl.col("metric_kind").is_in(list(kinds))
    text_value = pl.col("value_text").str.strip_chars()
    has_number = _typ("value_numeric") == "number"
    blank_text = (_typ("value_text") == "string") & (text_value.str.len_chars() == 0)
    obj = pl.col("is_object")

    # (reason, applies, message); every condition is false (not null) when it does not apply.
    rules: list[tuple[str, pl.Expr, pl.Expr]] = [
        ("not_an_object", ~obj, pl.lit("the row is not a JSON object")),
        (
            "unknown_metric_kind",
            obj & ~kind_ok.fill_null(False),
            pl.format("metric_kind {} is not a known kind", _shown("metric_kind")),
        ),
        (
            "bad_window_start",
            obj & start.is_null(),
            pl.format("window_start {} is not an ISO-8601 timestamp", _shown("window_start")),
        ),
        (
            "bad_window_end",
            obj & end.is_null(),
            pl.format("window_end {} is not an ISO-8601 timestamp", _shown("window_end")),
        ),
        (
            "window_not_increasing",
            obj & (end <= start).fill_null(False),
            pl.format(
                "window_end {} is not after window_start {}",
                pl.col("window_end"),
                pl.col("window_start"),
            ),
        ),
        (
            "bad_value_numeric",
            obj
            & _given("value_numeric")
            & (~has_number | ~(number.abs() < MAX_ABS_VALUE).fill_null(False)),
            pl.format(
                "value_numeric {} is not a number below 10^14 in magnitude", _shown("value_numeric")
            ),
        ),
        (
            "bad_value_text",
            obj & _given("value_text") & (_typ("value_text") != "string"),
            pl.format("value_text {} is not a string", _shown("value_text")),
        ),
        (
            "no_value",
            obj & ~_given("value_numeric") & (~_given("value_text") | blank_text),
            pl.lit("neither value_numeric nor a non-empty value_text is given"),
        ),
        (
            "bad_currency",
            obj
            & _given("currency")
            & ~(
                (_typ("currency") == "string") & pl.col("currency").is_in(list(ISO_4217))
            ).fill_null(False),
            pl.format(
                "currency {} is not an ISO-4217 code (three capital letters, e.g. USD)",
                _shown("currency"),
            ),
        ),
        (
            "missing_currency",
            obj
            & pl.col("metric_kind").is_in(list(monetary_kinds)).fill_null(False)
            & ~_given("currency"),
            pl.format("metric_kind {} is monetary and needs a currency", pl.col("metric_kind")),
        ),
        (
            "nul_character",
            obj
            & (
                pl.col("value_text").str.contains("\x00", literal=True).fill_null(False)
                | pl.col("payload_jsonb").str.contains(_JSON_NUL).fill_null(False)
            ),
            pl.format(
                "{} contains a NUL character (\\u0000), which PostgreSQL text and jsonb"
                " cannot store; remove it from the adapter output",
                pl.when(pl.col("value_text").str.contains("\x00", literal=True).fill_null(False))
                .then(pl.lit("value_text"))
                .otherwise(pl.lit("payload_jsonb")),
            ),
        ),
    ]
    checked = raw.with_columns(
        window_start_ts=start,
        window_end_ts=end,
        reasons=pl.concat_list(
            [pl.when(cond).then(pl.lit(reason)) for reason, cond, _ in rules]
        ).list.drop_nulls(),
        messages=pl.concat_list(
            [pl.when(cond).then(message) for _, cond, message in rules]
        ).list.drop_nulls(),
    )
    # Among rows that pass every other rule, the first of each (kind, window) in an object wins.
    clean = pl.col("reasons").list.len() == 0
    repeat = clean & (
        pl.int_range(pl.len()).over(
            ["object", "metric_kind", "window_start_ts", "window_end_ts", clean],
            order_by="row",
        )
        > 0
    )
    checked = checked.with_columns(
        reasons=pl.when(repeat).then(pl.lit(["duplicate_row"])).otherwise(pl.col("reasons")),
        messages=pl.when(repeat)
        .then(
            pl.concat_list(
                pl.format(
                    "repeats metric_kind {} for window {} .. {} of an earlier row",
                    pl.col("metric_kind"),
                    pl.col("window_start"),
                    pl.col("window_end"),
                )
            )
        )
        .otherwise(pl.col("messages")),
    ).sort("object", "row")

    valid = (
        checked.filter(pl.col("reasons").list.len() == 0)
        .select(
            "object",
            "row",
            "metric_kind",
            window_start=pl.col("window_start_ts"),
            window_end=pl.col("window_end_ts"),
            value_numeric=pl.when(has_number).then(pl.col("value_numeric")),
            value_text=pl.when(_typ("value_text") == "string").then(pl.col("value_text")),
            currency=pl.when(_given("currency")).then(pl.col("currency")),
            payload_jsonb=pl.when(_given("payload_jsonb")).then(pl.col("payload_jsonb")),
        )
        .cast(VALID_ROWS)
    )
    rejected = (
        checked.filter(pl.col("reasons").list.len() > 0)
        .select(
            "object",
            "row",
            "reasons",
            detail=pl.col("messages").list.join("; "),
        )
        .cast(REJECTED_ROWS)
    )
    return valid, rejected
