"""Parse, validate, enrich and compute orders with Polars, one batch at a time.

Every payload leaves here either as a staging row or as a reject with a reason; nothing is
dropped and nothing raises on bad input. Parsing turns raw bytes into typed columns (strict
JSON types: a number where a string belongs is a reject, not a coercion); everything after
that is vectorised Polars expressions over the whole batch.
"""

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from orders_pipeline.redis_patterns.keys import MAX_ORDER_ID_LENGTH

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_QUANTITY = 1_000_000
MAX_UNIT_PRICE = 1e12
MAX_TEXT_LENGTH = 64

# field -> (Polars dtype, accepted Python types, type name for messages)
FIELDS: dict[str, tuple[pl.DataType, tuple[type, ...], str]] = {
    "order_id": (pl.String(), (str,), "a string"),
    "customer_id": (pl.Int64(), (int,), "an integer"),
    "product_id": (pl.String(), (str,), "a string"),
    "quantity": (pl.Int64(), (int,), "an integer"),
    "unit_price": (pl.Float64(), (int, float), "a number"),
    "currency": (pl.String(), (str,), "a string"),
    "zip_code": (pl.String(), (str,), "a string"),
    "order_timestamp": (pl.String(), (str,), "a string"),
}
RAW_SCHEMA = {name: dtype for name, (dtype, _, _) in FIELDS.items()}
REJECT_SCHEMA = {"batch_position": pl.Int32, "raw_payload": pl.Binary, "reason": pl.String,
                 "order_id": pl.String}
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%.f%z"


@dataclass(frozen=True)
class ParsedBatch:
    """Typed rows (with `batch_position`) and the payloads that could not be parsed."""
    rows: pl.DataFrame
    rejects: pl.DataFrame


class _PayloadError(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _PayloadError(f"invalid JSON: {name} is not a number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _PayloadError("invalid JSON: duplicate key")
    return obj


def _parse_one(raw: bytes) -> dict[str, object]:
    """One payload to a dict of typed fields; raises _PayloadError with the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _PayloadError(f"payload is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except _PayloadError:
        raise
    except (ValueError, RecursionError) as exc:
        raise _PayloadError(f"invalid JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise _PayloadError(f"payload is a JSON {type(obj).__name__}, not an object")
    out: dict[str, object] = {}
    for name, (_, types, type_name) in FIELDS.items():
        value = obj.get(name)
        if value is None:
            raise _PayloadError(f"missing field: {name}")
        if isinstance(value, bool) or not isinstance(value, types):
            raise _PayloadError(f"{name} must be {type_name}, got {type(value).__name__}")
        if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
            if name == "unit_price":
                value = float(value) if abs(value) < 1e300 else math.inf
            else:
                raise _PayloadError(f"{name} is out of range")
        if isinstance(value, str) and not value.isascii():
            try:  # JSON may escape a lone surrogate (\ud800), which no column can hold
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _PayloadError(f"{name} contains an unpaired surrogate") from None
        out[name] = value
    return out


def _typed_field_pattern() -> str:
    """A regex matching one top-level field whose JSON literal has the contract's type."""
    literal = {"a string": r'"[^"]*"', "an integer": r"-?(?:0|[1-9][0-9]*)",
               "a number": r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"}
    by_type: dict[str, list[str]] = {}
    for name, (_, _, type_name) in FIELDS.items():
        by_type.setdefault(type_name, []).append(name)
    return "|".join(rf'"(?:{"|".join(names)})"\s*:\s*{literal[type_name]}\s*[,}}]'
                    for type_name, names in by_type.items())


# For a flat object (exactly two braces, no brackets, escapes or control characters) these
# vectorised counts (each field once, each of the right JSON type) vouch for the types, so
# Polars may parse it (it would quietly turn a number into a string) and still agree with
# the strict per-row parser.
_STRUCTURAL = r"[{}\[\]\\\x00-\x1f]"
_TYPED_FIELD = _typed_field_pattern()
_ANY_FIELD = rf'"(?:{"|".join(FIELDS)})"\s*:'


def _fast_rows(payloads: Sequence[bytes]) -> tuple[pl.DataFrame | None, list[int]]:
    """Parse the plainly well-formed payloads with Polars in one go, vectorised.

    Returns (typed rows or None, positions left for the strict per-row parser). Anything
    unusual (non-ASCII, escapes, nesting, a field of the wrong type, missing or repeated, or
    a line Polars refuses) goes to the per-row parser, the reference for every reason.
    """
    everything = list(range(len(payloads)))
    joined = b"\n".join(payloads)
    if joined.isascii() and joined.count(b"\n") == len(payloads) - 1 and b"\r" not in joined:
        candidates = everything
    else:
        candidates = [i for i, p in enumerate(payloads)
                      if p.isascii() and b"\n" not in p and b"\r" not in p]
    if not candidates:
        return None, everything
    text = pl.Series("t", [payloads[i] for i in candidates] if candidates is not everything
                     else payloads, dtype=pl.Binary).cast(pl.String)
    eligible = ((text.str.count_matches(_STRUCTURAL) == 2)
                & (text.str.count_matches(_ANY_FIELD) == len(FIELDS))
                & (text.str.count_matches(_TYPED_FIELD) == len(FIELDS))).to_list()
    fast = [i for i, ok in zip(candidates, eligible, strict=True) if ok]
    if not fast:
        return None, everything
    lines = joined if len(fast) == len(payloads) else b"\n".join(payloads[i] for i in fast)
    try:
        rows = pl.read_ndjson(io.BytesIO(lines), schema=RAW_SCHEMA)
    except pl.exceptions.PolarsError:
        return None, everything
    if rows.height != len(fast):
        return None, everything
    rows = rows.with_columns(pl.Series("batch_position", fast, dtype=pl.Int32))
    complete = rows.select(pl.all_horizontal(pl.all().is_not_null())).to_series()
    fast_set = set(rows.filter(complete)["batch_position"].to_list())
    return rows.filter(complete), [i for i in everything if i not in fast_set]


def parse_payloads(payloads: Sequence[bytes]) -> ParsedBatch:
    """Raw queue elements to typed columns; unparseable ones become rejects."""
    fast, slow_positions = _fast_rows(payloads)
    columns: dict[str, list[object]] = {name: [] for name in FIELDS}
    positions: list[int] = []
    bad_positions: list[int] = []
    bad_reasons: list[str] = []
    for position in slow_positions:
        try:
            parsed = _parse_one(payloads[position])
        except _PayloadError as exc:
            bad_positions.append(position)
            bad_reasons.append(str(exc))
            continue
        positions.append(position)
        for name in FIELDS:
            columns[name].append(parsed[name])
    slow = pl.DataFrame({"batch_position": positions, **columns},
                        schema={"batch_position": pl.Int32, **RAW_SCHEMA}, strict=False)
    rows = slow if fast is None else pl.concat([fast.select(slow.columns), slow])
    rejects = pl.DataFrame({
        "batch_position": bad_positions,
        "raw_payload": [payloads[p] for p in bad_positions],
        "reason": bad_reasons,
        "order_id": [None] * len(bad_positions),
    }, schema=REJECT_SCHEMA)
    return ParsedBatch(rows, rejects)


def _text_check(name: str, max_length: int) -> pl.Expr:
    col = pl.col(name)
    return (pl.when(col.str.len_chars() == 0).then(pl.lit(f"{name} is empty"))
            .when(col.str.len_chars() > max_length)
            .then(pl.lit(f"{name} is longer than {max_length} characters"))
            .when(col.str.contains("\x00", literal=True))
            .then(pl.lit(f"{name} contains a NUL character")))


def _first_reason(*checks: pl.Expr) -> pl.Expr:
    return pl.coalesce(*checks).alias("reason")


def validate_values(rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Check value ranges and parse timestamps to UTC; returns (valid rows, reason rows)."""
    timestamp = (pl.col("order_timestamp").str.replace(r"[zZ]$", "+00:00")
                 .str.to_datetime(_TIMESTAMP_FORMAT, strict=False, time_zone="UTC"))
    checked = rows.with_columns(timestamp.alias("_ts")).with_columns(_first_reason(
        _text_check("order_id", MAX_ORDER_ID_LENGTH),
        pl.when(pl.col("customer_id") <= 0).then(pl.lit("customer_id must be positive")),
        _text_check("product_id", MAX_TEXT_LENGTH),
        pl.when(pl.col("quantity") <= 0).then(pl.lit("quantity must be greater than 0"))
        .when(pl.col("quantity") > MAX_QUANTITY)
        .then(pl.lit(f"quantity must be at most {MAX_QUANTITY}")),
        pl.when(~pl.col("unit_price").is_finite()).then(pl.lit("unit_price must be finite"))
        .when(pl.col("unit_price") < 0).then(pl.lit("unit_price must be >= 0"))
        .when(pl.col("unit_price") > MAX_UNIT_PRICE)
        .then(pl.lit(f"unit_price must be at most {MAX_UNIT_PRICE:.0f}")),
        _text_check("currency", MAX_TEXT_LENGTH),
        _text_check("zip_code", MAX_TEXT_LENGTH),
        pl.when(pl.col("_ts").is_null())
        .then(pl.lit("order_timestamp is not ISO 8601 with a UTC offset"))
        # Postgres cannot read back a year outside 1..9999 as Polars writes it; one such
        # order would fail its whole batch's COPY on every retry.
        .when(~pl.col("_ts").dt.year().is_between(1, 9999))
        .then(pl.lit("order_timestamp is outside the years 0001-9999 (UTC)")),
    ))
    valid = (checked.filter(pl.col("reason").is_null())
             .drop("reason", "order_timestamp").rename({"_ts": "order_timestamp"}))
    invalid = checked.filter(pl.col("reason").is_not_null()).select(
        "batch_position", "reason", "order_id")
    return valid, invalid


def lookup_ids(rows: pl.DataFrame) -> dict[str, list[str]]:
    """The distinct ids a batch needs from each lookup table."""
    return {
        "products": rows["product_id"].unique().to_list(),
        "currencies": rows["currency"].unique().to_list(),
        "zip_codes": rows["zip_code"].unique().to_list(),
    }


def enrich(rows: pl.DataFrame, lookups: dict[str, pl.DataFrame]
           ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Join lookups and compute totals; returns (staging rows, reason rows)."""
    joined = (rows
              .join(lookups["products"], on="product_id", how="left")
              .join(lookups["currencies"], on="currency", how="left")
              .join(lookups["zip_codes"], on="zip_code", how="left"))
    checked = joined.with_columns(_first_reason(
        pl.when(pl.col("category").is_null())
        .then(pl.format("unknown product_id: {}", pl.col("product_id"))),
        pl.when(pl.col("rate_to_usd").is_null())
        .then(pl.format("unknown currency: {}", pl.col("currency"))),
        pl.when(pl.col("region").is_null())
        .then(pl.format("unknown zip_code: {}", pl.col("zip_code"))),
    ))
    invalid = checked.filter(pl.col("reason").is_not_null()).select(
        "batch_position", "reason", "order_id")
    unit_price = pl.col("unit_price").cast(pl.Decimal(18, 4))
    total = (unit_price * pl.col("quantity")).cast(pl.Decimal(24, 4))
    rate = pl.col("rate_to_usd").cast(pl.Decimal(18, 8))
    staged = (checked.filter(pl.col("reason").is_null())
              .with_columns(
                  unit_price.alias("unit_price"),
                  total.alias("total_amount"),
                  (total * rate).round(2, mode="half_away_from_zero")
                  .cast(pl.Decimal(22, 2)).alias("total_amount_usd"),
                  pl.col("shipping_zone").cast(pl.Int16),
              ).drop("reason", "rate_to_usd"))
    return staged, invalid


def rejects_from(reasons: pl.DataFrame, payloads: Sequence[bytes]) -> pl.DataFrame:
    """Attach the raw payload, byte for byte, to each rejected position."""
    positions = reasons["batch_position"].to_list()
    return pl.DataFrame({
        "batch_position": positions,
        "raw_payload": [payloads[p] for p in positions],
        "reason": reasons["reason"],
        # Informational only (raw_payload is exact), and Postgres text cannot hold NUL.
        "order_id": reasons["order_id"].str.replace_all("\x00", "\ufffd", literal=True),
    }, schema=REJECT_SCHEMA)


def orders_per_minute(rows: pl.DataFrame) -> dict[int, int]:
    """Order counts by the epoch second starting each order's minute (for the time window)."""
    if rows.is_empty():
        return {}
    minutes = (rows.select((pl.col("order_timestamp").dt.epoch("s") // 60 * 60).alias("m"))
               .group_by("m").len())
    return dict(zip(minutes["m"].to_list(), minutes["len"].to_list(), strict=True))
