"""Parse, validate, enrich and compute orders with Polars, one batch at a time.

Every payload leaves here either as a staging row or as a reject with a reason; nothing is
dropped and nothing raises on bad input. Parsing turns raw bytes into typed columns (strict
JSON types: a number where a string belongs is a reject, not a coercion); everything after
that is vectorised Polars expressions over the whole batch.
"""

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import polars as pl

from orders_pipeline import contract
from orders_pipeline.contract import RAW_SCHEMA

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
REJECT_SCHEMA = {"batch_position": pl.Int32, "raw_payload": pl.Binary, "reason": pl.String,
                 "order_id": pl.String}
_JSON_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "string": ((str,), "a string"),
    "integer": ((int,), "an integer"),
    "number": ((int, Decimal), "a number"),
}
# Out-of-int64 integers never reach the vectorised rules; they break the same rule.
_INT_RANGE_REASON = {"customer_id": contract.CUSTOMER_ID_RANGE,
                     "quantity": contract.QUANTITY_RANGE}
# Literals the plain-decimal rule rejects for the same reason as an exponent form too large
# or too fine to write out (1e999999999, 1e-999999999).
_PRICE_TOO_LARGE_LITERAL = "1" + "0" * (contract.UNIT_PRICE_INT_DIGITS + 1)
_PRICE_TOO_FINE_LITERAL = "0." + "0" * contract.UNIT_PRICE_SCALE + "1"


@dataclass(frozen=True)
class ParsedBatch:
    """Raw typed rows (RAW_SCHEMA + `batch_position`, in batch order) and the rejects."""
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


def plain_decimal(value: int | Decimal) -> str:
    """A JSON number as a plain decimal literal (no exponent), exactly.

    Exponent forms too large or too fine to write out become a literal that breaks the
    same value rule (`contract.UNIT_PRICE_TOO_LARGE` / `UNIT_PRICE_PLACES`).
    """
    if isinstance(value, int):
        return str(value)
    sign = "-" if value.is_signed() else ""
    if value.is_zero():
        return f"{sign}0"
    if value.adjusted() > contract.UNIT_PRICE_INT_DIGITS:
        return sign + _PRICE_TOO_LARGE_LITERAL
    # Exponent of the last non-zero digit, computed without a context (normalize() would
    # round 1e-999999999 to 0 and format() would then write a billion zeros).
    digits = "".join(map(str, value.as_tuple().digits))
    exponent = int(value.as_tuple().exponent) + len(digits) - len(digits.rstrip("0"))
    if exponent < -contract.UNIT_PRICE_SCALE:
        return sign + _PRICE_TOO_FINE_LITERAL
    return format(value, "f")


def _parse_one(raw: bytes) -> dict[str, object]:
    """One payload to a dict of raw typed fields; raises _PayloadError with the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _PayloadError(f"payload is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=Decimal,
                         object_pairs_hook=_unique_keys)
    except _PayloadError:
        raise
    except (ValueError, RecursionError) as exc:
        raise _PayloadError(f"invalid JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise _PayloadError(f"payload is a JSON {type(obj).__name__}, not an object")
    out: dict[str, object] = {}
    for field in contract.PAYLOAD_FIELDS:
        name = field.name
        if name not in obj:
            raise _PayloadError(f"missing field: {name}")
        value = obj[name]
        types, type_name = _JSON_TYPES[field.json_type]
        if isinstance(value, bool) or not isinstance(value, types):
            got = "null" if value is None else type(value).__name__.replace("Decimal", "float")
            raise _PayloadError(f"{name} must be {type_name}, got {got}")
        if field.json_type == "number":
            value = plain_decimal(value)
        elif isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
            raise _PayloadError(_INT_RANGE_REASON[name])
        elif isinstance(value, str) and not value.isascii():
            try:  # JSON may escape a lone surrogate (\ud800), which no column can hold
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _PayloadError(f"{name} contains an unpaired surrogate") from None
        out[name] = value
    return out


# Literals the fast path vouches for: strings without escapes, integers that fit Int64
# (at most 18 digits), and plain decimals (no exponent) for numbers.
_FAST_LITERALS = {"string": r'"[^"]*"', "integer": r"-?(?:0|[1-9][0-9]{0,17})",
                  "number": r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?"}


def _typed_field_pattern() -> str:
    """A regex matching one field whose JSON literal has the contract's type."""
    by_type: dict[str, list[str]] = {}
    for field in contract.PAYLOAD_FIELDS:
        by_type.setdefault(field.json_type, []).append(field.name)
    return "|".join(rf'"(?:{"|".join(names)})"\s*:\s*{_FAST_LITERALS[json_type]}\s*[,}}]'
                    for json_type, names in by_type.items())


# For a flat object (exactly two braces, no brackets, escapes or control characters, the
# whole line one object) whose keys are all distinct and whose contract fields each appear
# with a literal of the right type, Polars parses exactly what the strict parser would; the
# unit_price literal is taken from the text itself, never through a float.
_STRUCTURAL = r"[{}\[\]\\\x00-\x1f]"
_ONE_OBJECT = r"^\s*\{.*\}\s*$"
_ANY_KEY = r'"[^"]*"\s*:'
_TYPED_FIELD = _typed_field_pattern()
_PRICE_LITERAL = rf'"unit_price"\s*:\s*({_FAST_LITERALS["number"]})\s*[,}}]'
_FAST_READ_SCHEMA = {name: dtype for name, dtype in RAW_SCHEMA.items() if name != "unit_price"}


def _distinct_keys(text: pl.Series) -> pl.Series:
    """Per flat object: True when no key appears twice (unknown keys included).

    An object with exactly the contract's fields (the usual case) is checked by counting;
    only objects with extra keys pay for listing their keys.
    """
    count = text.str.count_matches(_ANY_KEY)
    distinct = count == len(contract.PAYLOAD_FIELDS)
    extra = count > len(contract.PAYLOAD_FIELDS)
    if extra.any():
        keys = text.filter(extra).str.extract_all(_ANY_KEY).list.eval(
            pl.element().str.replace(r"\s*:$", ""))
        distinct = distinct.scatter(extra.arg_true(), keys.list.len() == keys.list.n_unique())
    return distinct


def _fast_rows(payloads: Sequence[bytes]) -> tuple[pl.DataFrame | None, list[int]]:
    """Parse the plainly well-formed payloads with Polars in one go, vectorised.

    Returns (raw typed rows or None, positions left for the strict per-row parser).
    Anything unusual (non-ASCII, escapes, nesting, a key repeated, a field of the wrong
    type or missing, an exponent, a line Polars refuses) goes to the per-row parser, the
    reference for every reason. Both paths hand identical values to the same value rules.
    """
    everything = list(range(len(payloads)))
    candidates = [i for i, p in enumerate(payloads)
                  if p.isascii() and b"\n" not in p and b"\r" not in p]
    if not candidates:
        return None, everything
    text = pl.Series("t", [payloads[i] for i in candidates], dtype=pl.Binary).cast(pl.String)
    eligible = ((text.str.count_matches(_STRUCTURAL) == 2)
                & text.str.contains(_ONE_OBJECT)
                & _distinct_keys(text)
                & (text.str.count_matches(_TYPED_FIELD) == len(contract.PAYLOAD_FIELDS)))
    chosen = text.filter(eligible)
    fast = [i for i, ok in zip(candidates, eligible.to_list(), strict=True) if ok]
    if not fast:
        return None, everything
    try:
        rows = pl.read_ndjson(io.BytesIO(b"\n".join(payloads[i] for i in fast)),
                              schema=_FAST_READ_SCHEMA)
    except pl.exceptions.PolarsError:
        return None, everything
    if rows.height != len(fast):
        return None, everything
    rows = rows.with_columns(
        chosen.str.extract(_PRICE_LITERAL, 1).alias("unit_price"),
        pl.Series("batch_position", fast, dtype=pl.Int32),
    ).select("batch_position", *RAW_SCHEMA)
    complete = rows.select(pl.all_horizontal(pl.all().is_not_null())).to_series()
    fast_set = set(rows.filter(complete)["batch_position"].to_list())
    return rows.filter(complete), [i for i in everything if i not in fast_set]


def parse_payloads(payloads: Sequence[bytes]) -> ParsedBatch:
    """Raw queue elements to raw typed columns in batch order; unparseable ones are rejects."""
    fast, slow_positions = _fast_rows(payloads)
    columns: dict[str, list[object]] = {name: [] for name in RAW_SCHEMA}
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
        for name in RAW_SCHEMA:
            columns[name].append(parsed[name])
    slow = pl.DataFrame({"batch_position": positions, **columns},
                        schema={"batch_position": pl.Int32, **RAW_SCHEMA}, strict=False)
    rows = slow if fast is None else pl.concat([fast, slow]).sort("batch_position")
    rejects = pl.DataFrame({
        "batch_position": bad_positions,
        "raw_payload": [payloads[p] for p in bad_positions],
        "reason": bad_reasons,
        "order_id": [None] * len(bad_positions),
    }, schema=REJECT_SCHEMA)
    return ParsedBatch(rows, rejects)


def validate_values(rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Apply the contract's value rules; returns (valid typed rows, reason rows).

    Valid rows carry `unit_price` as Decimal(18,4) and `order_timestamp` as UTC Datetime;
    reason rows have `batch_position`, `reason`, `order_id`.
    """
    checked = contract.apply_value_rules(rows)
    valid = checked.filter(pl.col("reason").is_null()).drop("reason")
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
    checked = joined.with_columns(pl.coalesce(
        pl.when(pl.col("category").is_null()).then(contract.unknown_reference("product_id")),
        pl.when(pl.col("rate_to_usd").is_null()).then(contract.unknown_reference("currency")),
        pl.when(pl.col("region").is_null()).then(contract.unknown_reference("zip_code")),
    ).alias("reason"))
    invalid = checked.filter(pl.col("reason").is_not_null()).select(
        "batch_position", "reason", "order_id")
    total = (pl.col("unit_price") * pl.col("quantity")).cast(pl.Decimal(24, 4))
    rate = pl.col("rate_to_usd").cast(pl.Decimal(18, 8))
    # Scale 12 holds the exact product of scale 4 and scale 8: the only rounding is the
    # final one to cents (Polars would otherwise round the product to scale 8 first).
    exact_usd = total.cast(pl.Decimal(38, 12)) * rate
    staged = (checked.filter(pl.col("reason").is_null())
              .with_columns(
                  total.alias("total_amount"),
                  exact_usd.round(2, mode="half_away_from_zero")
                  .cast(pl.Decimal(22, 2)).alias("total_amount_usd"),
                  pl.col("shipping_zone").cast(pl.Int16),
              ).drop("reason", "rate_to_usd").sort("batch_position"))
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
