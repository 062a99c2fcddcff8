"""The order contract: one place for every field, type, bound, rule and reject reason.

Source of the rules: DESIGN.md "Order payload" and "Value rules". Everything else derives
from here: the parse schema and fast-path patterns (`transform`), the staging COPY and the
promotion INSERT column lists (`postgres_patterns`), the `dagster/column_schema` metadata
(`assets.tables`), and the generator's payload schema. A test checks that the DDL in
`orders_pipeline/sql/` declares exactly the Postgres types below.

Bounds follow from the storage types, so that every accepted order can be stored in
`orders` and summed into any view row (the derivation is `UNIT_PRICE_MAX`'s comment).
All value rules are Polars expressions over typed raw columns, evaluated the same way
whichever parse path produced the row: the verdict on a payload depends on its bytes alone.
"""

from dataclasses import dataclass
from decimal import Decimal

import polars as pl

# --------------------------------------------------------------------------- bounds

ORDER_ID_MAX_CHARS = 256
CUSTOMER_ID_MIN, CUSTOMER_ID_MAX = 1, 2**63 - 1
QUANTITY_MIN, QUANTITY_MAX = 1, 1_000_000
UNIT_PRICE_SCALE = 4
# rate_to_usd is numeric(12, 8): below 10^4 (the dearest real currency, KWD, is ~3.3 USD).
RATE_TO_USD_INT_DIGITS = 4
# total_amount_usd is numeric(22, 2), so below 10^20. With quantity <= 10^6 and
# rate_to_usd < 10^4, unit_price < 10^20 / (10^6 * 10^4) = 10^10 keeps every order's USD
# total storable; total_amount (numeric(24, 4)) is then < 10^16 and unit_price fits its
# numeric(18, 4). View sums are wider still (see sql/030_views.sql).
UNIT_PRICE_INT_DIGITS = 10
UNIT_PRICE_MAX = Decimal(10) ** UNIT_PRICE_INT_DIGITS - Decimal(1).scaleb(-UNIT_PRICE_SCALE)
YEAR_MIN, YEAR_MAX = 1970, 2100
TEXT_SHOWN_IN_REASON = 64

# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class PayloadField:
    """One field of the JSON payload and of the stored row.

    `json_type` is the JSON type required in the payload; `raw_dtype` the Polars dtype a
    parser hands to the value rules (unit_price stays the exact decimal literal as text);
    `pg_type` the column type in `orders_staging` and `orders`.
    """

    name: str
    json_type: str        # "string" | "integer" | "number"
    raw_dtype: pl.DataType
    pg_type: str
    description: str


PAYLOAD_FIELDS: tuple[PayloadField, ...] = (
    PayloadField("order_id", "string", pl.String(), "text",
                 f"unique order id as sent: 1-{ORDER_ID_MAX_CHARS} characters, no control "
                 "characters, no leading/trailing whitespace (primary key of `orders`)"),
    PayloadField("customer_id", "integer", pl.Int64(), "bigint",
                 f"JSON integer, {CUSTOMER_ID_MIN} to 2^63-1"),
    PayloadField("product_id", "string", pl.String(), "text",
                 "exactly a `products.product_id` of the lookup snapshot"),
    PayloadField("quantity", "integer", pl.Int64(), "integer",
                 f"JSON integer literal, {QUANTITY_MIN} to {QUANTITY_MAX:,}"),
    PayloadField("unit_price", "number", pl.String(), "numeric(18,4)",
                 f"in `currency`, exact from the JSON literal: 0 to {UNIT_PRICE_MAX}, at "
                 f"most {UNIT_PRICE_SCALE} decimal places (never rounded)"),
    PayloadField("currency", "string", pl.String(), "text",
                 "ISO 4217 code, exactly a `currencies.currency_code` of the snapshot"),
    PayloadField("zip_code", "string", pl.String(), "text",
                 "exactly a `zip_codes.zip_code` of the snapshot"),
    PayloadField("order_timestamp", "string", pl.String(), "timestamptz",
                 f"ISO 8601 date-time with offset, years {YEAR_MIN}-{YEAR_MAX}; stored in UTC"),
)
FIELD_NAMES = tuple(f.name for f in PAYLOAD_FIELDS)
RAW_SCHEMA: dict[str, pl.DataType] = {f.name: f.raw_dtype for f in PAYLOAD_FIELDS}


@dataclass(frozen=True)
class DerivedColumn:
    """A stored column computed by the pipeline, not sent by producers."""

    name: str
    pg_type: str
    description: str


DERIVED_COLUMNS: tuple[DerivedColumn, ...] = (
    DerivedColumn("total_amount", "numeric(24,4)",
                  "unit_price x quantity exactly, in `currency`"),
    DerivedColumn("total_amount_usd", "numeric(22,2)",
                  "round(total_amount x rate_to_usd, 2), half away from zero"),
    DerivedColumn("category", "text", "from `products`"),
    DerivedColumn("region", "text", "from `zip_codes`"),
    DerivedColumn("shipping_zone", "smallint", "from `zip_codes`"),
)
# Columns of a stored order (staging and `orders`), in COPY/INSERT order after `batch_id`.
ORDER_COLUMNS: tuple[str, ...] = (*FIELD_NAMES, *(c.name for c in DERIVED_COLUMNS))
PG_TYPES: dict[str, str] = {**{f.name: f.pg_type for f in PAYLOAD_FIELDS},
                            **{c.name: c.pg_type for c in DERIVED_COLUMNS}}
DESCRIPTIONS: dict[str, str] = {**{f.name: f.description for f in PAYLOAD_FIELDS},
                                **{c.name: c.description for c in DERIVED_COLUMNS}}

# --------------------------------------------------------------------------- reasons
# Every reject reason the value rules give (JSON/shape reasons are in `transform`).

ORDER_ID_EMPTY = "order_id is empty"
ORDER_ID_TOO_LONG = f"order_id is longer than {ORDER_ID_MAX_CHARS} characters"
ORDER_ID_CONTROL = "order_id contains a control character"
ORDER_ID_WHITESPACE = "order_id has leading or trailing whitespace"
CUSTOMER_ID_RANGE = f"customer_id must be an integer from {CUSTOMER_ID_MIN} to 2^63-1"
QUANTITY_RANGE = f"quantity must be an integer from {QUANTITY_MIN} to {QUANTITY_MAX}"
UNIT_PRICE_NEGATIVE = "unit_price must be >= 0"
UNIT_PRICE_PLACES = (f"unit_price has more than {UNIT_PRICE_SCALE} decimal places "
                     "(prices are never rounded)")
UNIT_PRICE_TOO_LARGE = f"unit_price must be at most {UNIT_PRICE_MAX}"
# Timestamp reasons name their field: the same grammar checks signals' `published_at`.
_TIMESTAMP_REASONS = (
    "{field} is not ISO 8601 YYYY-MM-DDTHH:MM[:SS[.fraction]] with Z or an offset ±HH[:MM]",
    "{field} has a field out of range (month, day, hour, minute, second)",
    f"{{field}} year is outside {YEAR_MIN}-{YEAR_MAX}",
)
TIMESTAMP_FORMAT, TIMESTAMP_RANGE, TIMESTAMP_YEAR = (
    reason.format(field="order_timestamp") for reason in _TIMESTAMP_REASONS)
UNKNOWN_REFERENCE = "unknown {field}: {value}"  # product_id, currency, zip_code

# --------------------------------------------------------------------------- grammars

# A plain decimal literal (sign, digits, optional fraction); exponent forms are turned into
# this by the strict parser before the rules see them.
PLAIN_DECIMAL = r"^(-?)([0-9]+)(?:\.([0-9]+))?$"
# Exactly the plain decimals the price rules accept: at most UNIT_PRICE_INT_DIGITS digits
# after leading zeros, at most UNIT_PRICE_SCALE before trailing zeros, a minus sign only on
# zero. One pattern, so that a row's price is checked in one pass (`_price_reason` says why
# the others break a rule).
PRICE_WITHIN_RULES = (rf"^(?:0*[0-9]{{1,{UNIT_PRICE_INT_DIGITS}}}"
                      rf"(?:\.[0-9]{{1,{UNIT_PRICE_SCALE}}}0*)?|-0+(?:\.0+)?)$")
# DESIGN.md "Value rules": YYYY-MM-DDTHH:MM[:SS[(.|,)fraction]] then Z, ±HH:MM, ±HHMM, ±HH.
TIMESTAMP = (r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2})"
             r"(?::([0-9]{2})(?:[.,]([0-9]{1,9}))?)?"
             r"(?:(Z)|([+-])([0-9]{2})(?::?([0-9]{2}))?)$")
_TS_GROUPS = ("year", "month", "day", "hour", "minute", "second", "fraction", "zulu",
              "sign", "off_hour", "off_minute")
_TS_TEXT_GROUPS = ("fraction", "zulu", "sign")
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f-\x9f]"
EDGE_WHITESPACE = r"^\s|\s$"  # Unicode White_Space


def _first(*checks: pl.Expr) -> pl.Expr:
    """The first non-null reason, in rule order."""
    return pl.coalesce(*checks)


def _order_id_reason() -> pl.Expr:
    col = pl.col("order_id")
    return _first(
        pl.when(col.str.len_chars() == 0).then(pl.lit(ORDER_ID_EMPTY)),
        pl.when(col.str.len_chars() > ORDER_ID_MAX_CHARS).then(pl.lit(ORDER_ID_TOO_LONG)),
        pl.when(col.str.contains(CONTROL_CHARACTERS)).then(pl.lit(ORDER_ID_CONTROL)),
        pl.when(col.str.contains(EDGE_WHITESPACE)).then(pl.lit(ORDER_ID_WHITESPACE)),
    )


def _price_parts() -> pl.Expr:
    """The literal's sign, integer digits without leading zeros and fraction digits without
    trailing zeros, as struct fields `_p_sign`, `_p_int`, `_p_frac` (all null if not plain)."""
    literal = pl.col("unit_price").str.extract_groups(PLAIN_DECIMAL)
    return pl.struct(
        literal.struct.field("1").alias("_p_sign"),
        literal.struct.field("2").str.strip_chars_start("0").alias("_p_int"),
        literal.struct.field("3").fill_null("").str.strip_chars_end("0").alias("_p_frac"),
    ).alias("_p")


def _price_reason() -> pl.Expr:
    int_digits, frac_digits = pl.col("_p_int"), pl.col("_p_frac")
    is_zero = (int_digits.str.len_chars() == 0) & (frac_digits.str.len_chars() == 0)
    return _first(
        pl.when(pl.col("_p_sign").is_null()).then(pl.lit(UNIT_PRICE_PLACES)),  # not plain
        pl.when((pl.col("_p_sign") == "-") & ~is_zero).then(pl.lit(UNIT_PRICE_NEGATIVE)),
        pl.when(frac_digits.str.len_chars() > UNIT_PRICE_SCALE).then(pl.lit(UNIT_PRICE_PLACES)),
        pl.when(int_digits.str.len_chars() > UNIT_PRICE_INT_DIGITS)
        .then(pl.lit(UNIT_PRICE_TOO_LARGE)),
    )


_TS_PARTS = pl.Struct({f"_t_{name}": pl.String if name in _TS_TEXT_GROUPS else pl.Int64
                       for name in _TS_GROUPS})


def _with_timestamp_parts(frame: pl.DataFrame, field: str) -> pl.DataFrame:
    """`frame` plus the grammar's groups of `field` as columns `_t_<group>` (null where the
    text does not match), Int64 but for the fraction, zulu and sign texts."""
    groups = pl.col(field).str.extract_groups(TIMESTAMP).struct.rename_fields(
        list(_TS_PARTS.to_schema())).cast(_TS_PARTS)
    return frame.with_columns(groups.alias("_t")).unnest("_t")


def _days_in_month() -> pl.Expr:
    year, month = pl.col("_t_year"), pl.col("_t_month")
    leap = ((year % 4 == 0) & (year % 100 != 0)) | (year % 400 == 0)
    return (pl.when(month == 2).then(pl.when(leap).then(29).otherwise(28))
            .when(month.is_in([4, 6, 9, 11])).then(30).otherwise(31))


def _timestamp_checks() -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """(no match, a field out of range, year out of range) over the `_t_*` columns, in the
    order the reasons are given; each true where that part of the rule is broken."""
    t = {name: pl.col(f"_t_{name}") for name in _TS_GROUPS}
    out_of_range = ((t["month"] < 1) | (t["month"] > 12) | (t["day"] < 1)
                    | (t["day"] > _days_in_month()) | (t["hour"] > 23) | (t["minute"] > 59)
                    | (t["second"].fill_null(0) > 59) | (t["off_hour"].fill_null(0) > 23)
                    | (t["off_minute"].fill_null(0) > 59))
    return t["year"].is_null(), out_of_range, ~t["year"].is_between(YEAR_MIN, YEAR_MAX)


def _timestamp_reason(field: str = "order_timestamp") -> pl.Expr:
    reasons = (r.format(field=field) for r in _TIMESTAMP_REASONS)
    return _first(*(pl.when(broken).then(pl.lit(reason))
                    for broken, reason in zip(_timestamp_checks(), reasons, strict=True)))


def timestamp_reason(text: str, field: str) -> str | None:
    """Why `text` breaks the timestamp grammar (reason naming `field`), or None if it is valid.

    The same expressions as the orders' rule, for one value (e.g. a signal's `published_at`).
    """
    frame = pl.DataFrame({field: [text]}, schema={field: pl.String})
    return _with_timestamp_parts(frame, field).select(_timestamp_reason(field)).item()


def _reason() -> pl.Expr:
    """The first rule a row breaks, in field order, or null (needs `_p_*` and `_t_*`)."""
    customer, quantity = pl.col("customer_id"), pl.col("quantity")
    return _first(
        _order_id_reason(),
        pl.when((customer < CUSTOMER_ID_MIN) | (customer > CUSTOMER_ID_MAX))
        .then(pl.lit(CUSTOMER_ID_RANGE)),
        pl.when((quantity < QUANTITY_MIN) | (quantity > QUANTITY_MAX))
        .then(pl.lit(QUANTITY_RANGE)),
        _price_reason(),
        _timestamp_reason(),
    )


def _breaks_no_rule() -> pl.Expr:
    """True exactly where `_reason()` is null, in one cheap pass (needs `_t_*` only): the same
    bounds, the two order_id patterns as one, the price rules as PRICE_WITHIN_RULES."""
    order_id = pl.col("order_id")
    return pl.all_horizontal(
        order_id.str.len_chars().is_between(1, ORDER_ID_MAX_CHARS),
        ~order_id.str.contains(f"{CONTROL_CHARACTERS}|{EDGE_WHITESPACE}"),
        pl.col("customer_id").is_between(CUSTOMER_ID_MIN, CUSTOMER_ID_MAX),
        pl.col("quantity").is_between(QUANTITY_MIN, QUANTITY_MAX),
        pl.col("unit_price").str.contains(PRICE_WITHIN_RULES),
        *(~broken for broken in _timestamp_checks()),
    ).fill_null(False)


def _timestamp_value() -> pl.Expr:
    """The instant in UTC, microseconds, from the `_t_*` columns and `_nanos` (the fraction in
    nanoseconds); finer fractions round half to even, as Postgres does.

    Only for rows that break no timestamp rule: `pl.datetime` raises on an impossible date.
    """
    t = {name: pl.col(f"_t_{name}") for name in _TS_GROUPS}
    local = pl.datetime(t["year"], t["month"], t["day"], t["hour"], t["minute"],
                        t["second"].fill_null(0), time_unit="us").dt.epoch("us")
    micros, rest = pl.col("_nanos") // 1000, pl.col("_nanos") % 1000
    micros = micros + ((rest > 500) | ((rest == 500) & (micros % 2 == 1))).cast(pl.Int64)
    offset_s = (t["off_hour"].fill_null(0) * 3600 + t["off_minute"].fill_null(0) * 60) * (
        pl.when(t["sign"] == "-").then(-1).otherwise(1))
    return (local + micros - offset_s * 1_000_000).cast(pl.Datetime("us", "UTC"))


def apply_value_rules(rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split raw rows into (valid typed rows, reason rows) by the contract's value rules.

    Input: RAW_SCHEMA columns plus `batch_position`. Valid rows keep the input's columns
    and order, with `unit_price` as Decimal(18,4) and `order_timestamp` as Datetime(us, UTC);
    reason rows have `batch_position`, `reason` (String: the first broken rule, in field
    order) and `order_id`. Every row is checked in one cheap pass (`_breaks_no_rule`); only
    the rows that break a rule are given their reason.
    """
    checked = _with_timestamp_parts(rows, "order_timestamp").with_columns(
        _breaks_no_rule().alias("_valid"))
    broken = checked.filter(~pl.col("_valid"))
    if broken.is_empty():
        reasons = pl.DataFrame(schema={"batch_position": rows.schema["batch_position"],
                                       "reason": pl.String, "order_id": pl.String})
    else:
        reasons = (broken.with_columns(_price_parts()).unnest("_p")
                   .select("batch_position", _reason().alias("reason"), "order_id"))
    nanos = pl.col("_t_fraction").fill_null("").str.pad_end(9, "0").cast(pl.Int64)
    valid = (checked.filter(pl.col("_valid"))
             .with_columns(nanos.alias("_nanos"))
             .with_columns(
                 pl.col("unit_price").cast(pl.Decimal(18, UNIT_PRICE_SCALE), strict=False),
                 _timestamp_value().alias("order_timestamp"))
             .select(rows.columns))
    return valid, reasons


def shown(value: pl.Expr) -> pl.Expr:
    """A payload text safe and short enough to quote in a reason (Postgres text has no NUL)."""
    return (pl.when(value.str.len_chars() > TEXT_SHOWN_IN_REASON)
            .then(pl.concat_str(value.str.slice(0, TEXT_SHOWN_IN_REASON), pl.lit("…")))
            .otherwise(value)
            .str.replace_all(CONTROL_CHARACTERS, "\ufffd"))


def unknown_reference(field: str) -> pl.Expr:
    """Reason for a product_id, currency or zip_code that is not in the lookup snapshot."""
    head, tail = UNKNOWN_REFERENCE.split("{value}")
    return pl.concat_str(pl.lit(head.format(field=field)), shown(pl.col(field)), pl.lit(tail))
