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
    same first value rule as the written-out form: the sign's, then too many decimal places
    (`contract.UNIT_PRICE_PLACES`), then too large (`UNIT_PRICE_TOO_LARGE`).
    """
    if isinstance(value, int):
        return str(value)
    sign = "-" if value.is_signed() else ""
    if value.is_zero():
        return f"{sign}0"
    # Exponent of the last non-zero digit, computed without a context (normalize() would
    # round 1e-999999999 to 0 and format() would then write a billion zeros).
    digits = "".join(map(str, value.as_tuple().digits))
    exponent = int(value.as_tuple().exponent) + len(digits) - len(digits.rstrip("0"))
    if exponent < -contract.UNIT_PRICE_SCALE:
        return sign + _PRICE_TOO_FINE_LITERAL
    if value.adjusted() > contract.UNIT_PRICE_INT_DIGITS:
        return sign + _PRICE_TOO_LARGE_LITERAL
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


def _typed_field_pattern(literals: dict[str, str], space: str) -> str:
    """A regex matching one contract field (`"name": literal`) whose literal has its type."""
    by_type: dict[str, list[str]] = {}
    for field in contract.PAYLOAD_FIELDS:
        by_type.setdefault(field.json_type, []).append(field.name)
    return "|".join(rf'"(?:{"|".join(names)})"{space}:{space}{literals[json_type]}'
                    for json_type, names in by_type.items())


# The usual payload, vouched for by one regex pass: a flat object of exactly as many members
# as the contract has fields, each a contract field with a literal of its type, strings of
# printable ASCII without escapes or brackets, only spaces between tokens. Such a line has
# no key twice exactly when every field comes out of `read_ndjson` non-null, which
# `_fast_rows` checks.
_USUAL_FIELD = _typed_field_pattern(
    {**_FAST_LITERALS, "string": r'"[\x20-\x7f--["\\\[\]{}]]*"'}, " *")
_USUAL_LINE = (rf"^ *\{{ *(?:{_USUAL_FIELD})"
               rf"(?: *, *(?:{_USUAL_FIELD})){{{len(contract.PAYLOAD_FIELDS) - 1}}} *\}} *$")
# Any other flat object (exactly two braces, no brackets, escapes or control characters, the
# whole line one object) whose keys are all distinct and whose contract fields each appear
# with a literal of the right type: Polars parses exactly what the strict parser would. In
# both cases the unit_price literal is taken from the text itself, never through a float.
_STRUCTURAL = r"[{}\[\]\\\x00-\x1f]"
_ONE_OBJECT = r"^\s*\{.*\}\s*$"
_ANY_KEY = r'"[^"]*"\s*:'
_SPACE = r"\s*"
_TYPED_FIELD = rf"(?:{_typed_field_pattern(_FAST_LITERALS, _SPACE)}){_SPACE}[,}}]"
# On a line either check vouched for, the one "unit_price" key is followed by a plain
# decimal literal: its characters are the whole literal.
_PRICE_LITERAL = r'"unit_price"\s*:\s*([-.0-9]+)'
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


def _flat_objects(payloads: Sequence[bytes], text: pl.Series, positions: list[int]
                  ) -> list[int]:
    """Of `positions`, those whose payload is a flat object `read_ndjson` reads exactly.

    The general check, for payloads the usual pattern leaves out (extra keys, say); `text`
    holds every ASCII payload as a string.
    """
    candidates = [i for i in positions if payloads[i].isascii()
                  and b"\n" not in payloads[i] and b"\r" not in payloads[i]]
    if not candidates:
        return []
    lines = text.gather(candidates)
    flat = ((lines.str.count_matches(_STRUCTURAL) == 2)
            & lines.str.contains(_ONE_OBJECT)
            & _distinct_keys(lines)
            & (lines.str.count_matches(_TYPED_FIELD) == len(contract.PAYLOAD_FIELDS)))
    return [i for i, ok in zip(candidates, flat.to_list(), strict=True) if ok]


def _fast_rows(payloads: Sequence[bytes]) -> tuple[pl.DataFrame | None, list[int]]:
    """Parse the plainly well-formed payloads with Polars in one go, vectorised.

    Returns (raw typed rows or None, positions left for the strict per-row parser, in
    order). Anything unusual (non-ASCII, escapes, nesting, a key repeated, a field of the
    wrong type or missing, an exponent, a line Polars refuses) goes to the per-row parser,
    the reference for every reason. Both paths hand identical values to the same value rules.
    """
    everything = list(range(len(payloads)))
    try:
        text = pl.Series("t", payloads, dtype=pl.Binary).cast(pl.String)
    except pl.exceptions.PolarsError:  # not UTF-8: never fast, so any text will do there
        text = pl.Series("t", [p if p.isascii() else b"" for p in payloads],
                         dtype=pl.Binary).cast(pl.String)
    eligible = text.str.contains(_USUAL_LINE)
    if not eligible.all():
        flat = _flat_objects(payloads, text, (~eligible).arg_true().to_list())
        if flat:
            eligible = eligible.scatter(flat, True)
    fast = eligible.arg_true()
    if fast.is_empty():
        return None, everything
    lines = payloads if fast.len() == len(payloads) else [payloads[i] for i in fast]
    try:
        rows = pl.read_ndjson(io.BytesIO(b"\n".join(lines)), schema=_FAST_READ_SCHEMA)
    except pl.exceptions.PolarsError:
        return None, everything
    if rows.height != fast.len():
        return None, everything
    rows = rows.with_columns(
        text.filter(eligible).str.extract(_PRICE_LITERAL, 1).alias("unit_price"),
        fast.cast(pl.Int32).set_sorted().alias("batch_position"),
    ).select("batch_position", *RAW_SCHEMA)
    rows = rows.filter(pl.all_horizontal(pl.all().is_not_null()))
    parsed = pl.zeros(len(payloads), pl.Boolean, eager=True).scatter(
        rows["batch_position"], True)
    return rows, (~parsed).arg_true().to_list()


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
    if fast is None:
        rows = slow
    elif slow.is_empty():
        rows = fast
    else:
        rows = pl.concat([fast, slow]).sort("batch_position")
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
    return contract.apply_value_rules(rows)


def lookup_ids(rows: pl.DataFrame) -> dict[str, list[str]]:
    """The distinct ids a batch needs from each lookup table."""
    return {
        "products": rows["product_id"].unique().to_list(),
        "currencies": rows["currency"].unique().to_list(),
        "zip_codes": rows["zip_code"].unique().to_list(),
    }


def enrich(rows: pl.DataFrame, lookups: dict[str, pl.DataFrame]
           ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Join lookups and compute totals; returns (staging rows, reason rows).

    `rows` are valid rows (`validate_values`); `lookups` the frames of `LookupCache.fetch`.
    Staging rows keep the input's order; reason rows have `batch_position`, `reason`,
    `order_id`, and only the rows with an unknown reference pay for building a reason.
    """
    currencies = lookups["currencies"].with_columns(pl.col("rate_to_usd").cast(pl.Decimal(18, 8)))
    zip_codes = lookups["zip_codes"].with_columns(pl.col("shipping_zone").cast(pl.Int16))
    joined = (rows
              .join(lookups["products"], on="product_id", how="left")
              .join(currencies, on="currency", how="left")
              .join(zip_codes, on="zip_code", how="left"))
    known = pl.all_horizontal(pl.col("category", "rate_to_usd", "region").is_not_null())
    unknown = joined.filter(~known)
    if unknown.is_empty():
        invalid = pl.DataFrame(schema={"batch_position": rows.schema["batch_position"],
                                       "reason": pl.String, "order_id": pl.String})
    else:
        invalid = unknown.select("batch_position", pl.coalesce(
            pl.when(pl.col("category").is_null()).then(contract.unknown_reference("product_id")),
            pl.when(pl.col("rate_to_usd").is_null()).then(contract.unknown_reference("currency")),
            pl.when(pl.col("region").is_null()).then(contract.unknown_reference("zip_code")),
        ).alias("reason"), "order_id")
    total = pl.col("total_amount")
    # Scale 12 holds the exact product of scale 4 and scale 8: the only rounding is the
    # final one to cents (Polars would otherwise round the product to scale 8 first).
    exact_usd = total.cast(pl.Decimal(38, 12)) * pl.col("rate_to_usd")
    staged = (joined.filter(known).sort("batch_position")
              .with_columns((pl.col("unit_price") * pl.col("quantity"))
                            .cast(pl.Decimal(24, 4)).alias("total_amount"))
              .with_columns(exact_usd.round(2, mode="half_away_from_zero")
                            .cast(pl.Decimal(22, 2)).alias("total_amount_usd"))
              .drop("rate_to_usd"))
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
