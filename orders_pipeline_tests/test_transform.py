"""Parse, validate, enrich: known inputs to known outputs, and every reason to reject."""

import json
from datetime import UTC, datetime
from decimal import Decimal

import polars as pl
import psycopg
import pytest

from orders_pipeline import contract, transform
from orders_pipeline.redis_patterns.lookup_cache import LookupCache

LOOKUPS = {
    "products": pl.DataFrame({"product_id": ["P1", "P2"], "category": ["Books", "Toys"]}),
    "currencies": pl.DataFrame({
        "currency": ["USD", "EUR", "JPY", "XTS", "MIL"],
        "rate_to_usd": ["1.00000000", "1.08000000", "0.00670000", "1.30000000", "0.00100000"],
    }),
    "zip_codes": pl.DataFrame({"zip_code": ["10001", "94105"], "region": ["Northeast", "West"],
                               "shipping_zone": ["6", "8"]}),
}
BASE: dict[str, object] = {
    "order_id": "o-1", "customer_id": 42, "product_id": "P1", "quantity": 3,
    "unit_price": 19.99, "currency": "EUR", "zip_code": "10001",
    "order_timestamp": "2024-05-01T12:00:00+02:00",
}


def order(**changes: object) -> bytes:
    return json.dumps({**BASE, **changes}).encode()


def without(field: str) -> bytes:
    return json.dumps({k: v for k, v in BASE.items() if k != field}).encode()


def run(payloads: list[bytes], lookups: dict[str, pl.DataFrame] | None = None
        ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The worker's transform steps: (staging rows, rejects with raw payloads)."""
    parsed = transform.parse_payloads(payloads)
    valid, invalid = transform.validate_values(parsed.rows)
    staged, unknown = transform.enrich(valid, LOOKUPS if lookups is None else lookups)
    rejects = pl.concat([parsed.rejects,
                         transform.rejects_from(pl.concat([invalid, unknown]), payloads)])
    assert staged.height + rejects.height == len(payloads)  # nothing dropped
    return staged, rejects.sort("batch_position")


def only_row(payload: bytes) -> dict[str, object]:
    staged, rejects = run([payload])
    assert rejects.is_empty(), rejects["reason"].to_list()
    return staged.row(0, named=True)


def test_known_order_is_enriched_and_converted() -> None:
    row = only_row(order())
    assert row["order_id"] == "o-1"
    assert row["customer_id"] == 42
    assert row["unit_price"] == Decimal("19.99")
    assert row["total_amount"] == Decimal("59.97")  # in EUR
    assert row["total_amount_usd"] == Decimal("64.77")  # 59.97 x 1.08 = 64.7676
    assert (row["category"], row["region"], row["shipping_zone"]) == ("Books", "Northeast", 6)
    assert row["order_timestamp"] == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def test_jpy_is_converted_with_its_small_rate() -> None:
    row = only_row(order(currency="JPY", unit_price=1500, quantity=2))
    assert row["total_amount"] == Decimal("3000")
    assert row["total_amount_usd"] == Decimal("20.10")  # 3000 x 0.0067


@pytest.mark.parametrize(("unit_price", "quantity", "currency", "usd"), [
    (1.05, 1, "XTS", "1.37"),      # 1.365 -> half up, not to even (1.36)
    (10.005, 1, "USD", "10.01"),   # 10.005 -> 10.01
    (0.125, 1, "USD", "0.13"),
    (5, 1, "MIL", "0.01"),         # 0.005
    (4, 1, "MIL", "0.00"),         # 0.004
    (0.1, 3, "USD", "0.30"),       # no binary float error
])
def test_usd_total_rounds_half_up(unit_price: float, quantity: int, currency: str,
                                  usd: str) -> None:
    row = only_row(order(unit_price=unit_price, quantity=quantity, currency=currency))
    assert row["total_amount_usd"] == Decimal(usd)


@pytest.mark.parametrize(("stamp", "utc"), [
    ("2024-05-01T12:00:00+02:00", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
    ("2024-05-01T01:15:00-05:30", datetime(2024, 5, 1, 6, 45, tzinfo=UTC)),
    ("2024-05-01T23:30:00-02:00", datetime(2024, 5, 2, 1, 30, tzinfo=UTC)),
    ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
    ("2024-05-01T10:00:00.123456+00:00", datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)),
])
def test_timestamps_are_converted_to_utc(stamp: str, utc: datetime) -> None:
    assert only_row(order(order_timestamp=stamp))["order_timestamp"] == utc


BAD_TIMESTAMP = contract.TIMESTAMP_FORMAT
NAN_ORDER = (b'{"order_id":"o","customer_id":1,"product_id":"P1","quantity":1,'
             b'"unit_price":NaN,"currency":"USD","zip_code":"10001",'
             b'"order_timestamp":"2024-05-01T10:00:00Z"}')


@pytest.mark.parametrize(("payload", "reason"), [
    (b'{"order_id": "o-1", ', "invalid JSON"),
    (b"", "invalid JSON"),
    (b"\xff\xfe{\"order_id\": \"x\"}\x80", "payload is not valid UTF-8"),
    (b"[1, 2]", "payload is a JSON list, not an object"),
    (b'"an order"', "not an object"),
    (b"null", "not an object"),
    (b'{"order_id": "a", "order_id": "b"}', "invalid JSON: duplicate key"),
    (without("zip_code"), "missing field: zip_code"),
    (order(product_id=None), "product_id must be a string, got null"),
    (order(customer_id=True), "customer_id must be an integer, got bool"),
    (order(quantity=False), "quantity must be an integer, got bool"),
    (order(quantity=2.0), "quantity must be an integer, got float"),
    (order(quantity="3"), "quantity must be an integer, got str"),
    (order(unit_price="19.99"), "unit_price must be a number, got str"),
    (order(unit_price=True), "unit_price must be a number, got bool"),
    (order(order_id=123), "order_id must be a string, got int"),
    (order(zip_code=10001), "zip_code must be a string, got int"),
    (order(currency=["EUR"]), "currency must be a string, got list"),
    (NAN_ORDER, "invalid JSON: NaN is not a number"),
    (NAN_ORDER.replace(b"NaN", b"Infinity"), "invalid JSON: Infinity is not a number"),
    (NAN_ORDER.replace(b"NaN", b"-Infinity"), "invalid JSON: -Infinity is not a number"),
    (NAN_ORDER.replace(b"NaN", b"1e400"), contract.UNIT_PRICE_TOO_LARGE),
    (order(customer_id=2**63), contract.CUSTOMER_ID_RANGE),
    (order(quantity=-(2**63) - 1), contract.QUANTITY_RANGE),
    (order(customer_id=0), contract.CUSTOMER_ID_RANGE),
    (order(quantity=0), contract.QUANTITY_RANGE),
    (order(quantity=-2), contract.QUANTITY_RANGE),
    (order(quantity=10**6 + 1), contract.QUANTITY_RANGE),
    (order(unit_price=-0.01), "unit_price must be >= 0"),
    (order(unit_price=1e13), contract.UNIT_PRICE_TOO_LARGE),
    (order(unit_price=10**10), contract.UNIT_PRICE_TOO_LARGE),
    (order(unit_price=0.12345), contract.UNIT_PRICE_PLACES),
    (order(unit_price=0.00005), contract.UNIT_PRICE_PLACES),
    (order(order_id="a\x00b"), contract.ORDER_ID_CONTROL),
    (order(order_id="line\nbreak"), contract.ORDER_ID_CONTROL),
    (order(order_id="tab\there"), contract.ORDER_ID_CONTROL),
    (order(order_id="del\x7f"), contract.ORDER_ID_CONTROL),
    (order(order_id="c1\x85"), contract.ORDER_ID_CONTROL),
    (order(order_id=" padded"), contract.ORDER_ID_WHITESPACE),
    (order(order_id="padded\u2003"), contract.ORDER_ID_WHITESPACE),
    (order(zip_code="100\x0001"), "unknown zip_code: 100\ufffd01"),
    (order(order_id="\ud800"), "order_id contains an unpaired surrogate"),
    (order(product_id="P\udfff1"), "product_id contains an unpaired surrogate"),
    (order(order_id=""), "order_id is empty"),
    (order(order_id="x" * 257), contract.ORDER_ID_TOO_LONG),
    (order(product_id="P-NOPE"), "unknown product_id: P-NOPE"),
    (order(currency="XXX"), "unknown currency: XXX"),
    (order(zip_code="99999"), "unknown zip_code: 99999"),
    (order(order_timestamp="2024-05-01T12:00:00"), BAD_TIMESTAMP),  # naive
    (order(order_timestamp="2024-05-01"), BAD_TIMESTAMP),
    (order(order_timestamp="yesterday at noon"), BAD_TIMESTAMP),
    (order(order_timestamp="2024-02-30T10:00:00Z"), contract.TIMESTAMP_RANGE),
])
def test_each_reject_reason(payload: bytes, reason: str) -> None:
    staged, rejects = run([order(order_id="good"), payload])
    assert staged["order_id"].to_list() == ["good"]
    assert rejects.height == 1
    reject = rejects.row(0, named=True)
    assert reject["batch_position"] == 1
    assert reason in reject["reason"]
    assert reject["raw_payload"] == payload  # byte for byte


def test_rejects_after_parsing_keep_their_order_id() -> None:
    _, rejects = run([order(order_id="neg", quantity=-1), order(order_id="who", product_id="?"),
                      b"{"])
    assert rejects["order_id"].to_list() == ["neg", "who", None]


@pytest.mark.parametrize("order_id", [
    "a,b,c", 'say "hi"', "back\\slash", "emoji 🚀📦", "ünïcødé", "'single'",
    "in side", "comma,\"quote\"\\", "x" * 256, "Ab", "ab",
])
def test_awkward_ids_survive(order_id: str) -> None:
    row = only_row(order(order_id=order_id))
    assert row["order_id"] == order_id


def test_escaped_surrogate_pair_is_a_character() -> None:
    payload = order(order_id="ship 🚀")
    assert b"\\ud83d\\ude80" in payload  # json.dumps escapes it as a surrogate pair
    assert only_row(payload)["order_id"] == "ship 🚀"


def test_lookups_from_the_real_cache(loaded_cache: LookupCache, pg: psycopg.Connection) -> None:
    product, category = pg.execute(
        "SELECT product_id, category FROM products ORDER BY product_id DESC LIMIT 1").fetchone()
    zip_code, region, zone = pg.execute(
        "SELECT zip_code, region, shipping_zone FROM zip_codes ORDER BY zip_code LIMIT 1"
    ).fetchone()
    eur = pg.execute("SELECT round(59.97 * rate_to_usd, 2) FROM currencies"
                     " WHERE currency_code = 'EUR'").fetchone()[0]
    payloads = [order(product_id=product, zip_code=zip_code),
                order(order_id="o-2", product_id="P-NOPE", zip_code=zip_code)]
    valid, _ = transform.validate_values(transform.parse_payloads(payloads).rows)

    staged, unknown = transform.enrich(valid, loaded_cache.fetch(transform.lookup_ids(valid)))

    row = staged.row(0, named=True)
    assert staged.height == 1
    assert (row["category"], row["region"], row["shipping_zone"]) == (category, region, zone)
    assert row["total_amount_usd"] == eur  # Postgres computes the same rounded USD total
    assert unknown["reason"].to_list() == ["unknown product_id: P-NOPE"]


def test_orders_per_minute() -> None:
    staged, _ = run([order(order_id="a", order_timestamp="2024-05-01T10:00:05Z"),
                     order(order_id="b", order_timestamp="2024-05-01T10:00:59Z"),
                     order(order_id="c", order_timestamp="2024-05-01T12:01:00+02:00")])
    minute = int(datetime(2024, 5, 1, 10, 0, tzinfo=UTC).timestamp())
    assert transform.orders_per_minute(staged) == {minute: 2, minute + 60: 1}
    assert transform.orders_per_minute(staged.clear()) == {}
