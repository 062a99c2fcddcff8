"""Property: whatever arrives on the queue, every payload ends in exactly one place.

Hypothesis draws lists of payloads: random bytes, random JSON (objects, arrays, nested),
orders with missing or mistyped fields, extreme numbers (1e308, 5e-324, 2**63, ...), NaN and
Infinity literals, NUL bytes, escaped lone surrogates, non-UTF-8 bytes, a few megabyte
payloads and SQL-looking strings, mixed with valid orders (real product ids, currencies and
zip codes) whose ids are full of commas, quotes, backslashes, newlines, tabs and emoji. They
are pushed with `push_batch` and run through the real staging worker and promotion. Then every
valid order is in `orders` once, id byte for byte and totals right; every other payload is in
`orders_rejected` byte for byte with a reason; orders + rejects + duplicates == pushed; and
nothing raised on the way (a raise would strand a whole batch: bad input must never do that).
"""

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal

import psycopg
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orders_pipeline import pipeline
from orders_pipeline.postgres_patterns.schema import CORE_TABLES
from orders_pipeline.postgres_patterns.views import VIEWS
from orders_pipeline.redis_patterns.dedup import DedupWindow
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.redis_patterns.lookup_cache import LookupCache
from orders_pipeline.redis_patterns.queue import OrderQueue
from orders_pipeline.settings import Settings
from orders_pipeline_tests.helpers import fresh_example

INT64_MAX = 2**63 - 1
MB = 2**20
# Modest by default; ORDERS_PROPERTY_EXAMPLES=500 for a longer hunt.
EXAMPLES = int(os.environ.get("ORDERS_PROPERTY_EXAMPLES", "25"))
ORDER_FIELDS = ("order_id", "customer_id", "product_id", "quantity", "unit_price", "currency",
                "zip_code", "order_timestamp")
TEXT_FIELDS = ("order_id", "product_id", "currency", "zip_code", "order_timestamp")
SQL_LOOKING = ("'; DROP TABLE orders; --", "x'); DROP TABLE orders; --",
               'Robert"); DELETE FROM orders_rejected; --', "1 OR 1=1", "$$; TRUNCATE orders $$",
               "\\.", "\\copy orders", "%s", "%(order_id)s", "{P}", "*", "?", "[a-z]")
AWKWARD = (",", '"', "'", "\\", "\n", "\r", "\r\n", "\t", "🚀", "📦", "👩‍👩‍👧", "\\.", "\n\\.\n",
           "é", "\u2028", "\x7f", "\x01", " ", "--", ";", *SQL_LOOKING)


@dataclass(frozen=True)
class Refs:
    """Real reference ids to build valid orders from, and every id to avoid in invalid ones."""
    products: tuple[str, ...]
    currencies: tuple[str, ...]
    zips: tuple[str, ...]
    rates: dict[str, Decimal]
    all_ids: frozenset[str]


@dataclass(frozen=True)
class Case:
    """One payload as pushed; `order` is set when it must end up in `orders`."""
    raw: bytes
    order: dict[str, object] | None = None


# --- strategies -----------------------------------------------------------------------------

OFFSETS = st.integers(-14 * 4, 14 * 4).map(lambda q: timezone(timedelta(minutes=15 * q)))
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
ID_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                  max_size=6)
ID_PART = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                  min_size=1, max_size=6)


def _render_timestamp(moment: datetime, zulu: bool) -> str:
    text = moment.isoformat()
    return text[:-6] + "Z" if zulu and text.endswith("+00:00") else text


TIMESTAMPS = st.builds(_render_timestamp,
                       st.datetimes(min_value=datetime(1970, 1, 1),
                                    max_value=datetime(2100, 12, 31), timezones=OFFSETS),
                       st.booleans())
def _control(c: str) -> bool:
    return ord(c) <= 0x1F or 0x7F <= ord(c) <= 0x9F


# Ids within the contract (1-256 characters, no control characters, no edge whitespace),
# built from awkward pieces; the others are rejects (test_contract.py covers those).
ORDER_IDS = st.lists(st.one_of(st.sampled_from(AWKWARD), ID_PART), min_size=1,
                     max_size=8).map(
    lambda parts: "".join(c for c in "".join(parts) if not _control(c))[:256].strip()
).filter(bool)
UNIT_PRICES = st.one_of(
    st.decimals(0, 10**6, places=2).map(float),
    st.decimals(0, 10**10 - 1, places=2).map(float),
    st.integers(0, 10**6),
    st.sampled_from([0, 0.0, -0.0, 0.0001, 9999999999.9999, 1.10]),
)
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), ANY_TEXT,
    st.sampled_from([1e308, -1e308, 5e-324, 2**63, -(2**63) - 1, 10**400]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(ORDER_FIELDS), st.text(max_size=8)), inner,
                        max_size=6)),
    max_leaves=20)
_CONTAINERS = st.one_of(st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
NOT_STRING = st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), _CONTAINERS)
NOT_NUMBER = st.one_of(ANY_TEXT, st.booleans(), st.none(), _CONTAINERS)
# Values of the right JSON type that are still out of range for the field.
BAD_NUMBERS: dict[str, list[object]] = {
    "customer_id": [0, -1, 2**63, -(2**63) - 1, 10**30],
    "quantity": [0, -1, 1_000_001, INT64_MAX, 2**63, -(2**63) - 1],
    "unit_price": [1e308, -1e308, 2**63, -(2**63) - 1, -0.01, 1e12 + 1, 1e13, 10**400,
                   10**10, 5e-324, 1e-5, 0.12345, 1e12],
}
WRONG_VALUES: dict[str, st.SearchStrategy[object]] = {
    **dict.fromkeys(TEXT_FIELDS, NOT_STRING),
    "customer_id": st.one_of(st.floats(), NOT_NUMBER, st.sampled_from(BAD_NUMBERS["customer_id"])),
    "quantity": st.one_of(st.floats(), NOT_NUMBER, st.sampled_from(BAD_NUMBERS["quantity"])),
    "unit_price": st.one_of(NOT_NUMBER, st.sampled_from(BAD_NUMBERS["unit_price"])),
}
BAD_TIMESTAMPS = st.one_of(ANY_TEXT, st.sampled_from([
    "2024-05-01T12:00:00", "2024-05-01", "yesterday at noon", "2024-02-30T10:00:00Z",
    "2024-05-01T24:00:00Z", "2024-05-01T12:00:00+25:00", "", "2024-5-1T12:00:00Z",
    "2024-05-01T12:00:60Z", "2024-05-01T12:00:00 +01:00", "1969-12-31T23:59:59Z",
    # Valid ISO 8601, but outside the years a timestamptz column prints and reads back.
    "0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00", "-0005-01-01T00:00:00+00:00",
]))
NON_UTF8 = (b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xe2\x82")
RENDERERS: tuple[Callable[[dict[str, object]], bytes], ...] = (
    lambda o: json.dumps(o).encode(),
    lambda o: json.dumps(o, ensure_ascii=False).encode(),
    lambda o: json.dumps(o, separators=(",", ":"), ensure_ascii=False).encode(),
    lambda o: json.dumps(o, indent=2).encode(),
    lambda o: b" \n\t" + json.dumps(o, sort_keys=True).encode() + b"\r\n ",
)


def valid_orders(refs: Refs) -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries({
        "order_id": ORDER_IDS,
        "customer_id": st.one_of(st.integers(1, 10**6), st.just(INT64_MAX)),
        "product_id": st.sampled_from(refs.products),
        "quantity": st.one_of(st.integers(1, 5), st.integers(1, 1_000_000)),
        "unit_price": UNIT_PRICES,
        "currency": st.sampled_from(refs.currencies),
        "zip_code": st.sampled_from(refs.zips),
        "order_timestamp": TIMESTAMPS,
    })


def valid_cases(refs: Refs) -> st.SearchStrategy[Case]:
    return st.builds(lambda order, render: Case(render(order), order),
                     valid_orders(refs), st.sampled_from(RENDERERS))


def _with(order: dict[str, object], field: str, value: object) -> bytes:
    return json.dumps({**order, field: value}).encode()


def _literal(order: dict[str, object], field: str, literal: str) -> bytes:
    return json.dumps({**order, field: "@@"}).replace('"@@"', literal).encode()


def _not_utf8(order: dict[str, object], bad: bytes) -> bytes:
    raw = json.dumps(order).encode()
    head = b'"order_id": "'
    return raw.replace(head, head + bad, 1)


def invalid_cases(refs: Refs) -> st.SearchStrategy[Case]:
    """Payloads that must be rejected, each for a reason the contract names."""
    base = valid_orders(refs)
    unknown = st.one_of(ANY_TEXT, st.sampled_from(SQL_LOOKING)).filter(
        lambda s: s not in refs.all_ids)
    payloads = st.one_of(
        st.binary(max_size=200),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        st.builds(lambda o, f: json.dumps({k: v for k, v in o.items() if k != f}).encode(),
                  base, st.sampled_from(ORDER_FIELDS)),
        st.sampled_from(ORDER_FIELDS).flatmap(
            lambda f: st.builds(_with, base, st.just(f), WRONG_VALUES[f])),
        st.builds(_literal, base, st.sampled_from(["unit_price", "quantity", "customer_id"]),
                  st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])),
        st.builds(lambda o, f, s, i: _with(o, f, s[:i] + "\x00" + s[i:]),
                  base, st.sampled_from(TEXT_FIELDS), ID_TEXT, st.integers(0, 6)),
        st.builds(lambda o, f, s: _with(o, f, s + "\ud800"),  # json.dumps writes \ud800
                  base, st.sampled_from(TEXT_FIELDS), ID_TEXT),
        st.builds(_not_utf8, base, st.sampled_from(NON_UTF8)),
        st.builds(lambda o: json.dumps({**o, "order_id": "é"}, ensure_ascii=False)
                  .encode("latin-1"), base),
        st.builds(_with, base, st.sampled_from(["product_id", "currency", "zip_code"]),
                  unknown),
        st.builds(_with, base, st.just("order_timestamp"), BAD_TIMESTAMPS),
        st.builds(lambda o: json.dumps(o).encode()[:-1] + b', "quantity": 1}', base),
        st.builds(lambda o: json.dumps(o).encode() + b"x", base),
        st.builds(lambda o: b"\xef\xbb\xbf" + json.dumps(o).encode(), base),
    )
    return payloads.map(Case)


def megabyte_cases(refs: Refs) -> st.SearchStrategy[Case]:
    """A few huge payloads: a valid order carrying 1 MB of extra data, and four rejects."""
    base = valid_orders(refs)
    return st.one_of(
        base.map(lambda o: Case(json.dumps({**o, "note": "x" * MB}).encode(), o)),
        base.map(lambda o: Case(json.dumps({**o, "order_id": "y" * MB}).encode())),
        st.just(Case(b"\xff" * MB)),
        st.just(Case(b"[" * MB)),
        st.just(Case(json.dumps(list(range(MB // 8))).encode())),
    )


def case_lists(refs: Refs) -> st.SearchStrategy[list[Case]]:
    small = st.lists(st.one_of(valid_cases(refs), invalid_cases(refs)), max_size=40)
    huge = st.one_of(st.just([]), st.lists(megabyte_cases(refs), min_size=1, max_size=2))

    @st.composite
    def assemble(draw: st.DrawFn) -> list[Case]:
        cases = draw(small) + draw(huge)
        cases = draw(st.permutations(cases))
        valid = [c for c in cases if c.order is not None]
        if valid:  # exact re-sends of valid orders: duplicates, dropped by the dedup window
            for case in draw(st.lists(st.sampled_from(valid), max_size=3)):
                cases.insert(draw(st.integers(0, len(cases))), case)
        return cases

    return assemble()


# --- expectations ---------------------------------------------------------------------------


def expected_row(order: dict[str, object], rates: dict[str, Decimal]) -> tuple[object, ...]:
    """The `orders` row an order must become, computed independently with Decimal."""
    price = Decimal(repr(order["unit_price"])).quantize(Decimal("0.0001"), ROUND_HALF_UP)
    quantity = int(str(order["quantity"]))
    total = price * quantity
    usd = (total * rates[str(order["currency"])]).quantize(Decimal("0.01"), ROUND_HALF_UP)
    stamp = datetime.fromisoformat(str(order["order_timestamp"]))
    return (order["order_id"], order["customer_id"], order["product_id"], quantity, price,
            order["currency"], order["zip_code"], stamp, total, usd)


def _digests(payloads: list[bytes]) -> Counter[str]:
    return Counter(hashlib.sha256(p).hexdigest() for p in payloads)


def assert_same_payloads(got: list[bytes], want: list[bytes]) -> None:
    """Multisets of payloads equal, with a readable message for megabyte ones."""
    if _digests(got) == _digests(want):
        return
    short = {hashlib.sha256(p).hexdigest(): p[:120] for p in got + want}
    missing = _digests(want) - _digests(got)
    extra = _digests(got) - _digests(want)
    raise AssertionError(f"rejects missing: {[short[d] for d in missing]}; "
                         f"unexpected rejects: {[short[d] for d in extra]}")


def run_pipeline(settings: Settings, rconn: redis.Redis, payloads: list[bytes],
                 push_size: int, claim_size: int) -> None:
    queue = OrderQueue(rconn, RedisKeys(settings.redis.key_prefix))
    for start in range(0, len(payloads), push_size):
        queue.push_batch(payloads[start:start + push_size])
    pipeline.stage_queue(settings, workers=1, batch_size=claim_size)
    pipeline.promote_staged(settings)


def assert_pipeline_empty(settings: Settings, rconn: redis.Redis,
                          pg: psycopg.Connection) -> None:
    """Staging empty, and no order left anywhere in Redis: queue, leases, batch lists."""
    keys = RedisKeys(settings.redis.key_prefix)
    assert pg.execute("SELECT count(*) FROM orders_staging").fetchone()[0] == 0
    assert rconn.llen(keys.ingestion) == 0
    assert rconn.zcard(keys.inflight) == 0 and rconn.zcard(keys.staged) == 0
    batches = [r[0] for r in pg.execute("SELECT batch_id FROM ingest_batches")]
    assert all(status == "promoted" for (status,) in pg.execute(
        "SELECT status FROM ingest_batches"))
    assert not batches or rconn.exists(*(keys.batch(b) for b in batches)) == 0


ORDER_COLUMNS = ("order_id, customer_id, product_id, quantity, unit_price, currency, zip_code,"
                 " order_timestamp, total_amount, total_amount_usd")


# --- tests ----------------------------------------------------------------------------------


def load_refs(pg: psycopg.Connection) -> Refs:
    products = [r[0] for r in pg.execute(
        "SELECT product_id FROM products WHERE product_id IN ('P000001', 'P000777')"
        " OR product_id = (SELECT max(product_id) FROM products) ORDER BY 1")]
    rates = dict(pg.execute("SELECT currency_code::text, rate_to_usd FROM currencies"))
    # USD, tiny and large rates, so USD rounding is exercised at both ends.
    currencies = ["USD", "EUR", "JPY", min(rates, key=rates.__getitem__),
                  max(rates, key=rates.__getitem__)]
    zips = [r[0] for r in pg.execute("SELECT zip_code FROM zip_codes ORDER BY zip_code LIMIT 5")]
    all_ids = {r[0] for r in pg.execute(
        "SELECT product_id FROM products UNION ALL SELECT currency_code::text FROM currencies"
        " UNION ALL SELECT zip_code FROM zip_codes")}
    assert len(products) == 3 and len(zips) == 5
    return Refs(tuple(products), tuple(currencies), tuple(zips), rates, frozenset(all_ids))


@hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_every_payload_lands_exactly_once(settings: Settings, rconn: redis.Redis,
                                          pg: psycopg.Connection, loaded_cache: LookupCache,
                                          data: st.DataObject) -> None:
    refs = load_refs(pg)
    settings = fresh_example(settings, rconn, pg)
    cases = data.draw(case_lists(refs), label="cases")
    push_size = data.draw(st.integers(1, 12), label="push batch size")
    claim_size = data.draw(st.integers(1, 9), label="claim batch size")

    run_pipeline(settings, rconn, [c.raw for c in cases], push_size, claim_size)

    expected: dict[str, Case] = {}
    duplicates = 0
    for case in cases:  # one worker claims in push order, so the first of an id wins
        if case.order is None:
            continue
        if case.order["order_id"] in expected:
            duplicates += 1
        else:
            expected[str(case.order["order_id"])] = case
    rows = pg.execute(f"SELECT {ORDER_COLUMNS} FROM orders").fetchall()
    by_id = {row[0]: row for row in rows}
    assert len(by_id) == len(rows)
    assert set(by_id) == set(expected)
    for order_id, case in expected.items():
        assert case.order is not None
        assert by_id[order_id] == expected_row(case.order, refs.rates)

    rejected = pg.execute("SELECT raw_payload, reason FROM orders_rejected").fetchall()
    assert_same_payloads([bytes(r[0]) for r in rejected],
                         [c.raw for c in cases if c.order is None])
    assert all(reason.strip() for _, reason in rejected)
    counted = pg.execute("SELECT coalesce(sum(duplicate_rows), 0) FROM ingest_batches"
                         " WHERE status = 'promoted'").fetchone()[0]
    assert counted == duplicates
    assert len(rows) + len(rejected) + counted == len(cases)
    assert_pipeline_empty(settings, rconn, pg)


INJECTION_IDS = (
    "x'); DROP TABLE orders; --",
    'Robert"); DELETE FROM orders_rejected; --',
    "'; DROP TABLE orders; --",
    "1' OR '1'='1",
    "{P}", "{orders}:ingestion", "}{", "*", "?", "[a-z]", "\\*", "ord-*",
    "%s", "%(order_id)s", "$1", "\\.", "line \\. after", "a,b\\Nc", '"quoted","csv"',
)


def test_injection_looking_values_are_stored_literally(
        settings: Settings, rconn: redis.Redis, pg: psycopg.Connection,
        loaded_cache: LookupCache) -> None:
    """SQL, CSV, Redis glob and hash-tag syntax in values is data, never code or patterns.

    The ids go through JSON, Redis keys (dedup marks), COPY CSV and INSERT ... SELECT; the
    same strings as product, currency and zip are unknown references, rejected with a reason.
    """
    zip_code = pg.execute("SELECT zip_code FROM zip_codes ORDER BY zip_code LIMIT 1").fetchone()[0]
    base = {"customer_id": 7, "product_id": "P000001", "quantity": 2, "unit_price": 10.5,
            "currency": "USD", "zip_code": zip_code,
            "order_timestamp": "2024-05-01T12:00:00+00:00"}
    valid = [json.dumps({**base, "order_id": oid}).encode() for oid in INJECTION_IDS]
    # `*` must not match `ord-*` or `?` in the dedup window: an exact re-send is a duplicate.
    resent = [valid[INJECTION_IDS.index("*")], valid[INJECTION_IDS.index("?")]]
    bad = [json.dumps({**base, "order_id": f"bad-{field}-{n}", field: text}).encode()
           for field in ("product_id", "currency", "zip_code")
           for n, text in enumerate(INJECTION_IDS[:4])]

    run_pipeline(settings, rconn, valid + resent + bad, push_size=7, claim_size=5)

    stored = dict(pg.execute("SELECT order_id, total_amount FROM orders").fetchall())
    assert stored == dict.fromkeys(INJECTION_IDS, Decimal("21.0000"))
    rejected = pg.execute("SELECT raw_payload, reason FROM orders_rejected").fetchall()
    assert sorted(bytes(r[0]) for r in rejected) == sorted(bad)
    assert all(reason.startswith("unknown ") for _, reason in rejected)
    assert pg.execute("SELECT sum(duplicate_rows) FROM ingest_batches").fetchone()[0] == 2
    present = pg.execute("SELECT count(to_regclass(t)) FROM unnest(%s::text[]) AS t",
                         (list(CORE_TABLES) + list(VIEWS),)).fetchone()[0]
    assert present == len(CORE_TABLES) + len(VIEWS)
    # Every id was marked in the dedup window: a different order with it is a duplicate.
    dedup = DedupWindow(rconn, RedisKeys(settings.redis.key_prefix),
                        settings.pipeline.dedup_window_seconds)
    probes = [f"probe:{n}" for n in range(len(INJECTION_IDS))]  # tokens of no batch
    assert dedup.check_and_mark(INJECTION_IDS, probes) == [False] * len(INJECTION_IDS)
    assert_pipeline_empty(settings, rconn, pg)
