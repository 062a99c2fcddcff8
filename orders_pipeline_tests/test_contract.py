"""The order contract (DESIGN.md "Value rules"): timestamps, ids, exact money, storage types.

Unit tables pin the issue's examples; generating tests compare the one implementation of each
rule (`orders_pipeline.contract`) with an independent reference written here.
"""

import json
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal

import polars as pl
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orders_pipeline import contract, transform

LOOKUPS = {
    "products": pl.DataFrame({"product_id": ["P1"], "category": ["Books"]}),
    "currencies": pl.DataFrame({"currency": ["USD", "GBP", "KWD"],
                                "rate_to_usd": ["1.00000000", "1.27000000", "3.25000000"]}),
    "zip_codes": pl.DataFrame({"zip_code": ["10001"], "region": ["Northeast"],
                               "shipping_zone": ["6"]}),
}
BASE = {"order_id": "o-1", "customer_id": 42, "product_id": "P1", "quantity": 1,
        "unit_price": 1, "currency": "USD", "zip_code": "10001",
        "order_timestamp": "2031-03-01T10:00:00Z"}


def payload(**changes: object) -> bytes:
    body = json.dumps({**BASE, **changes})
    price = changes.get("unit_price")
    if isinstance(price, str) and price.startswith("#"):  # a raw JSON number literal
        body = body.replace(f'"{price}"', price[1:])
    return body.encode()


def verdict(raw: bytes) -> dict[str, object] | str:
    """The staged row (dict) or the reject reason of one payload."""
    parsed = transform.parse_payloads([raw])
    if parsed.rejects.height:
        return parsed.rejects["reason"][0]
    valid, invalid = transform.validate_values(parsed.rows)
    staged, unknown = transform.enrich(valid, LOOKUPS)
    reasons = pl.concat([invalid, unknown])
    if reasons.height:
        return reasons["reason"][0]
    return staged.row(0, named=True)


# ----------------------------------------------------------------------------- money


@pytest.mark.parametrize(("price", "quantity", "currency", "total", "usd"), [
    ("#0.1234", 2, "USD", "0.2468", "0.25"),
    ("#0.0001", 1, "USD", "0.0001", "0.00"),
    ("#2.0005", 1, "USD", "2.0005", "2.00"),     # 2.0005 -> 2.00 (0.0005 < 0.005)
    ("#1.005", 1, "USD", "1.005", "1.01"),       # exact half: away from zero
    ("#1.10", 3, "USD", "3.3", "3.30"),
    ("#0.1", 3, "USD", "0.3", "0.30"),           # no binary float error
    ("#1.00000", 1, "USD", "1", "1.00"),         # trailing zeros are not decimal places
    ("#1.5e2", 1, "USD", "150", "150.00"),       # exponent form, exactly
    ("#9999999999.9999", 1_000_000, "KWD", "9999999999999900", "32499999999999675.00"),
])
def test_money_is_exact(price: str, quantity: int, currency: str, total: str,
                        usd: str) -> None:
    row = verdict(payload(unit_price=price, quantity=quantity, currency=currency))
    assert isinstance(row, dict), row
    assert row["unit_price"] == Decimal(price[1:])
    assert row["total_amount"] == Decimal(total)
    assert row["total_amount_usd"] == Decimal(usd)


@pytest.mark.parametrize(("price", "reason"), [
    ("#0.12345", contract.UNIT_PRICE_PLACES),    # the issue: stored as 0.1234 before
    ("#0.00005", contract.UNIT_PRICE_PLACES),    # the issue: stored as free before
    ("#2.00005", contract.UNIT_PRICE_PLACES),
    ("#1.00005", contract.UNIT_PRICE_PLACES),
    ("#1e-5", contract.UNIT_PRICE_PLACES),
    ("#1e-999999999", contract.UNIT_PRICE_PLACES),
    ("#-0.01", contract.UNIT_PRICE_NEGATIVE),
    ("#-1e999999999", contract.UNIT_PRICE_NEGATIVE),
    ("#10000000000", contract.UNIT_PRICE_TOO_LARGE),
    ("#999999999999.99", contract.UNIT_PRICE_TOO_LARGE),  # the poison value
    ("#1e999999999", contract.UNIT_PRICE_TOO_LARGE),
    ("1.5", "unit_price must be a number, got str"),
])
def test_prices_that_would_need_rounding_or_overflow_are_rejected(price: str,
                                                                  reason: str) -> None:
    assert verdict(payload(unit_price=price)) == reason


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**17), st.integers(0, 7), st.integers(1, 1_000_000),
       st.sampled_from(["USD", "GBP", "KWD"]))
def test_money_matches_exact_decimal_arithmetic(digits: int, places: int, quantity: int,
                                                currency: str) -> None:
    """Any decimal literal: accepted with exact totals iff it needs no rounding and fits."""
    price = Decimal(digits).scaleb(-places)
    literal = format(price, "f")
    row = verdict(payload(unit_price=f"#{literal}", quantity=quantity, currency=currency))
    if price != price.quantize(Decimal("0.0001")):
        assert row == contract.UNIT_PRICE_PLACES
    elif price > contract.UNIT_PRICE_MAX:
        assert row == contract.UNIT_PRICE_TOO_LARGE
    else:
        rate = Decimal(LOOKUPS["currencies"].filter(pl.col("currency") == currency)
                       ["rate_to_usd"][0])
        assert isinstance(row, dict), (literal, row)
        assert row["unit_price"] == price
        assert row["total_amount"] == price * quantity
        assert row["total_amount_usd"] == (price * quantity * rate).quantize(
            Decimal("0.01"), rounding=ROUND_HALF_UP)


# ----------------------------------------------------------------------------- timestamps

ACCEPTED = [
    ("2031-03-01T10:00:00Z", datetime(2031, 3, 1, 10, tzinfo=UTC)),
    ("2031-03-01T10:00:00+05", datetime(2031, 3, 1, 5, tzinfo=UTC)),      # hour-only offset
    ("2031-03-01T10:00Z", datetime(2031, 3, 1, 10, tzinfo=UTC)),          # no seconds
    ("2031-03-01T10:00:00,5Z", datetime(2031, 3, 1, 10, 0, 0, 500000, tzinfo=UTC)),
    ("2031-03-01T10:00:00.5Z", datetime(2031, 3, 1, 10, 0, 0, 500000, tzinfo=UTC)),
    ("2031-03-01T10:00:00-0330", datetime(2031, 3, 1, 13, 30, tzinfo=UTC)),
    ("2031-03-01T10:00:00+01:00", datetime(2031, 3, 1, 9, tzinfo=UTC)),
    ("2031-03-01T10:00:00.123456789Z", datetime(2031, 3, 1, 10, 0, 0, 123457, tzinfo=UTC)),
    ("2032-02-29T23:59:59Z", datetime(2032, 2, 29, 23, 59, 59, tzinfo=UTC)),
    ("2000-02-29T00:00Z", datetime(2000, 2, 29, tzinfo=UTC)),
    ("1970-01-01T00:00:00+01:00", datetime(1969, 12, 31, 23, tzinfo=UTC)),
    ("2100-12-31T23:59:59.9999995Z", datetime(2101, 1, 1, tzinfo=UTC)),  # rounds to even
]
REJECTED = [
    ("2031-1-1T1:2:3Z", contract.TIMESTAMP_FORMAT),                # unpadded fields
    ("2031-03-01T10:00:00 +01:00", contract.TIMESTAMP_FORMAT),     # space before offset
    ("2031-03-01T10:00:60Z", contract.TIMESTAMP_RANGE),            # no leap second
    ("2031-03-01T24:00:00Z", contract.TIMESTAMP_RANGE),            # no 24:00
    ("2031-02-29T10:00Z", contract.TIMESTAMP_RANGE),               # not a leap year
    ("1900-02-29T10:00Z", contract.TIMESTAMP_RANGE),
    ("2031-04-31T10:00Z", contract.TIMESTAMP_RANGE),
    ("2031-13-01T10:00Z", contract.TIMESTAMP_RANGE),
    ("2031-03-01T10:00:00+24:00", contract.TIMESTAMP_RANGE),
    ("1969-12-31T23:59:59Z", contract.TIMESTAMP_YEAR),
    ("2101-01-01T00:00:00Z", contract.TIMESTAMP_YEAR),
    ("2031-03-01T10:00:00", contract.TIMESTAMP_FORMAT),            # no offset
    ("2031-03-01", contract.TIMESTAMP_FORMAT),
    ("2031-03-01 10:00:00Z", contract.TIMESTAMP_FORMAT),
    ("2031-03-01T10:00:00z", contract.TIMESTAMP_FORMAT),
    ("2031-03-01T10:00:00.Z", contract.TIMESTAMP_FORMAT),
    ("2031-03-01T10:00:00.1234567890Z", contract.TIMESTAMP_FORMAT),
    ("2031-03-01T10Z", contract.TIMESTAMP_FORMAT),
    ("2031-03-01T10:00:00+5", contract.TIMESTAMP_FORMAT),
    ("2031-03-01T10:00:00+05:0", contract.TIMESTAMP_FORMAT),
    ("20310301T100000Z", contract.TIMESTAMP_FORMAT),
    ("２０３１-03-01T10:00:00Z", contract.TIMESTAMP_FORMAT),         # non-ASCII digits
]


@pytest.mark.parametrize(("stamp", "utc"), ACCEPTED)
def test_accepted_timestamp_forms(stamp: str, utc: datetime) -> None:
    row = verdict(payload(order_timestamp=stamp))
    assert isinstance(row, dict), row
    assert row["order_timestamp"] == utc


@pytest.mark.parametrize(("stamp", "reason"), REJECTED)
def test_rejected_timestamp_forms(stamp: str, reason: str) -> None:
    assert verdict(payload(order_timestamp=stamp)) == reason


DIGITS = "0123456789"


def reference_timestamp(text: str) -> datetime | None:
    """An independent reading of the DESIGN.md grammar, character by character."""
    def number(start: int, width: int) -> int | None:
        part = text[start:start + width]
        return int(part) if len(part) == width and all(c in DIGITS for c in part) else None

    fields = [number(0, 4), number(5, 2), number(8, 2), number(11, 2), number(14, 2)]
    if None in fields or [text[4:5], text[7:8], text[10:11], text[13:14]] != list("--T:"):
        return None
    year, month, day, hour, minute = fields  # type: ignore[misc]
    rest, second, fraction = text[16:], 0, ""
    if rest.startswith(":"):
        second = number(17, 2)
        if second is None:
            return None
        rest = text[19:]
        if rest[:1] in (".", ","):
            digits = len(rest) - len(rest[1:].lstrip(DIGITS)) - 1
            fraction, rest = rest[1:1 + digits], rest[1 + digits:]
            if not 1 <= len(fraction) <= 9:
                return None
    if rest == "Z":
        offset = 0
    elif rest[:1] in "+-" and len(rest) in (3, 5, 6) and rest:
        body = rest[1:].replace(":", "", 1) if len(rest) == 6 and rest[3] == ":" else rest[1:]
        if len(body) not in (2, 4) or not all(c in DIGITS for c in body):
            return None
        off_h, off_m = int(body[:2]), int(body[2:] or 0)
        if off_h > 23 or off_m > 59:
            return None
        offset = (off_h * 60 + off_m) * (-1 if rest[0] == "-" else 1)
    else:
        return None
    if not 1970 <= year <= 2100:
        return None
    try:
        local = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        return None
    micros = (Decimal(f"0.{fraction or 0}") * 1_000_000).quantize(Decimal(1),
                                                                   rounding=ROUND_HALF_EVEN)
    return local - timedelta(minutes=offset) + timedelta(microseconds=int(micros))


@st.composite
def timestamp_text(draw: st.DrawFn) -> str:
    """Near-miss and valid date-times: widths, separators, ranges and offsets varied."""
    def field(low: int, high: int, width: int) -> str:
        value = draw(st.integers(low, high))
        return str(value).zfill(draw(st.sampled_from([width, width, width, 1])))

    text = (f"{field(1960, 2110, 4)}-{field(0, 13, 2)}-{field(0, 32, 2)}"
            f"{draw(st.sampled_from(['T', 'T', 'T', ' ', 't']))}"
            f"{field(0, 25, 2)}:{field(0, 61, 2)}")
    if draw(st.booleans()):
        text += ":" + field(0, 61, 2)
        if draw(st.booleans()):
            text += draw(st.sampled_from([".", ",", ""])) + draw(
                st.text(st.sampled_from(DIGITS), min_size=0, max_size=10))
    sign = draw(st.sampled_from(["+", "-"]))
    text += draw(st.sampled_from([
        "Z", "z", "", f" {sign}01:00", f"{sign}{field(0, 25, 2)}",
        f"{sign}{field(0, 25, 2)}:{field(0, 61, 2)}", f"{sign}{field(0, 25, 2)}{field(0, 61, 2)}",
    ]))
    return text


@settings(max_examples=400, deadline=None)
@given(st.lists(timestamp_text(), min_size=1, max_size=20))
def test_timestamp_grammar_matches_an_independent_reference(stamps: list[str]) -> None:
    rows = [payload(order_id=f"o-{i}", order_timestamp=s) for i, s in enumerate(stamps)]
    parsed = transform.parse_payloads(rows)
    valid, invalid = transform.validate_values(parsed.rows)
    got = dict(zip(valid["batch_position"].to_list(), valid["order_timestamp"].to_list(),
                   strict=True))
    for i, stamp in enumerate(stamps):
        assert got.get(i) == reference_timestamp(stamp), stamp


# Plain decimal literals around every price bound: signs, leading and trailing zeros,
# 1-12 integer digits, 0-6 decimal places.
PRICE_LITERALS = st.builds(
    lambda sign, zeros, digits, fraction, trailing: (
        f"{sign}{'0' * zeros}{digits}{'.' + fraction + '0' * trailing if fraction else ''}"),
    st.sampled_from(["", "", "", "-"]), st.integers(0, 2),
    st.from_regex(r"\A[0-9]{1,12}\Z"), st.from_regex(r"\A([0-9]{1,6})?\Z"),
    st.integers(0, 40))


def mostly(good: st.SearchStrategy[object], *bad: st.SearchStrategy[object]
           ) -> st.SearchStrategy[object]:
    """`good` three times in four, so that one broken field often stands alone in a row."""
    return st.one_of(good, good, good, *bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    mostly(st.from_regex(r"\A[0-9a-z-]{1,12}\Z"), st.text(max_size=8),
           st.text(max_size=300), st.sampled_from(
               ["a\x7f", "a\x85", "\u3000a", "a\u2028", "x" * 256, "é" * 257])),
    mostly(st.integers(1, 10**6), st.integers(-2, 2), st.sampled_from([2**63 - 1, -(2**63)])),
    mostly(st.integers(1, 5), st.integers(-1, 2), st.integers(999_999, 1_000_002)),
    mostly(PRICE_LITERALS, st.sampled_from(["", "1.", ".5", "1e5", "+1", "1.5 ", "٣"])),
    mostly(st.sampled_from([stamp for stamp, _ in ACCEPTED]), timestamp_text(),
           st.text(max_size=30))), min_size=1, max_size=20))
def test_one_pass_check_agrees_with_every_rule(rows: list[tuple[str, int, int, str, str]]
                                               ) -> None:
    """`apply_value_rules` checks every row in one cheap pass and gives reasons only to the
    rows it finds broken: the split must be the one the full rule chain gives each row, and
    accepted values exact (price from the literal, instant from the reference reading)."""
    names = ("order_id", "customer_id", "quantity", "unit_price", "order_timestamp")
    frame = pl.DataFrame(
        {"batch_position": list(range(len(rows))),
         **{name: [row[i] for row in rows] for i, name in enumerate(names)},
         "product_id": "P1", "currency": "USD", "zip_code": "10001"},
        schema={"batch_position": pl.Int32, **contract.RAW_SCHEMA})
    valid, invalid = contract.apply_value_rules(frame)
    every_rule = (contract._with_timestamp_parts(frame, "order_timestamp")
                  .with_columns(contract._price_parts()).unnest("_p")
                  .select(contract._reason()).to_series().to_list())
    assert dict(zip(invalid["batch_position"], invalid["reason"], strict=True)) == {
        i: reason for i, reason in enumerate(every_rule) if reason is not None}
    assert valid["batch_position"].to_list() == [
        i for i, reason in enumerate(every_rule) if reason is None]
    assert valid.columns == frame.columns
    for position, price, instant in valid.select(
            "batch_position", "unit_price", "order_timestamp").iter_rows():
        assert price == Decimal(rows[position][3])
        assert instant == reference_timestamp(rows[position][4])


# ----------------------------------------------------------------------------- identifiers


@pytest.mark.parametrize(("order_id", "reason"), [
    ("", contract.ORDER_ID_EMPTY),
    ("x" * 257, contract.ORDER_ID_TOO_LONG),
    ("é" * 257, contract.ORDER_ID_TOO_LONG),       # characters, not bytes
    ("a\nb", contract.ORDER_ID_CONTROL),
    ("a\x00", contract.ORDER_ID_CONTROL),
    ("a\x9f", contract.ORDER_ID_CONTROL),
    (" a", contract.ORDER_ID_WHITESPACE),
    ("a ", contract.ORDER_ID_WHITESPACE),
    ("\u3000a", contract.ORDER_ID_WHITESPACE),
])
def test_order_id_rules(order_id: str, reason: str) -> None:
    assert verdict(payload(order_id=order_id)) == reason


@pytest.mark.parametrize("order_id", ["x" * 204, "é" * 256, "a b", "Ab", "ｏ-1", "🚀"])
def test_order_ids_within_the_rules_are_kept_exactly(order_id: str) -> None:
    row = verdict(payload(order_id=order_id))
    assert isinstance(row, dict), row
    assert row["order_id"] == order_id


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_order_id_verdict_follows_the_rules(order_id: str) -> None:
    def control(c: str) -> bool:
        return ord(c) <= 0x1F or 0x7F <= ord(c) <= 0x9F

    result = verdict(payload(order_id=order_id))
    if any(0xD800 <= ord(c) <= 0xDFFF for c in order_id):
        assert result == "order_id contains an unpaired surrogate"
    elif not order_id:
        assert result == contract.ORDER_ID_EMPTY
    elif len(order_id) > contract.ORDER_ID_MAX_CHARS:
        assert result == contract.ORDER_ID_TOO_LONG
    elif any(control(c) for c in order_id):
        assert result == contract.ORDER_ID_CONTROL
    elif order_id[0].isspace() or order_id[-1].isspace():
        assert result == contract.ORDER_ID_WHITESPACE
    else:
        assert isinstance(result, dict) and result["order_id"] == order_id


# ----------------------------------------------------------------------------- storage


def _column_types(pg: psycopg.Connection, table: str) -> dict[str, str]:
    rows = pg.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        (table,)).fetchall()
    short = {"timestamp with time zone": "timestamptz"}
    return {name: short.get(kind, kind.replace(", ", ",")) for name, kind in rows}


@pytest.mark.parametrize("table", ["orders", "orders_staging"])
def test_sql_declares_the_contract_types(pg: psycopg.Connection, table: str) -> None:
    declared = _column_types(pg, table)
    assert {n: declared[n] for n in contract.ORDER_COLUMNS} == {
        n: contract.PG_TYPES[n] for n in contract.ORDER_COLUMNS}
    assert _column_types(pg, "currencies")["rate_to_usd"] == (
        f"numeric({contract.RATE_TO_USD_INT_DIGITS + 8},8)")


def test_bounds_follow_from_the_storage_types() -> None:
    """The largest accepted order fits every numeric column it lands in."""
    def fits(value: Decimal, pg_type: str) -> bool:
        precision, scale = map(int, pg_type[len("numeric("):-1].split(","))
        return value == value.quantize(Decimal(1).scaleb(-scale)) and value < Decimal(
            10) ** (precision - scale)

    max_rate = Decimal(10) ** contract.RATE_TO_USD_INT_DIGITS - Decimal("0.00000001")
    total = contract.UNIT_PRICE_MAX * contract.QUANTITY_MAX
    usd = (total * max_rate).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    assert fits(contract.UNIT_PRICE_MAX, contract.PG_TYPES["unit_price"])
    assert fits(total, contract.PG_TYPES["total_amount"])
    assert fits(usd, contract.PG_TYPES["total_amount_usd"])
    assert contract.QUANTITY_MAX < 2**31  # quantity is integer
