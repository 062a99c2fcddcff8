"""Realistic order traffic: valid references, exact duplicates and invalid payloads on demand.

Orders are built column-wise with Polars and serialised with `write_ndjson`, then pushed in
batches, each with its completion signal, waiting whenever backpressure says the queue is full.
"""

import json
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import polars as pl
import psycopg

from orders_pipeline import contract
from orders_pipeline.redis_patterns.backpressure import Backpressure
from orders_pipeline.redis_patterns.queue import OrderQueue

# The payload's fields in contract order; unit_price is written as a JSON number of at most
# two decimal places (a Float64 rounded to cents prints as its shortest exact literal).
PAYLOAD_SCHEMA = {**contract.RAW_SCHEMA, "unit_price": pl.Float64()}
GENERATE_CHUNK = 100_000
INVALID_KINDS = (
    "bad_json", "missing_field", "negative_quantity", "unknown_product", "unknown_currency",
    "bad_timestamp", "wrong_type", "not_utf8",
)


@dataclass(frozen=True)
class References:
    """Ids and prices that valid generated orders may use."""
    products: pl.DataFrame    # product_id, base_price (USD)
    currencies: pl.DataFrame  # currency, rate_to_usd
    zip_codes: list[str]

    @classmethod
    def load(cls, conn: psycopg.Connection) -> "References":
        products = conn.execute(
            "SELECT product_id, base_price::float8 FROM products ORDER BY product_id").fetchall()
        currencies = conn.execute(
            "SELECT currency_code::text, rate_to_usd::float8 FROM currencies"
            " ORDER BY currency_code").fetchall()
        zips = [r[0] for r in conn.execute("SELECT zip_code FROM zip_codes ORDER BY zip_code")]
        conn.rollback()
        if not products or not currencies or not zips:
            raise RuntimeError("lookup tables are empty (run `orders-pipeline init-db`)")
        return cls(
            pl.DataFrame(products, schema={"product_id": pl.String, "base_price": pl.Float64},
                         orient="row"),
            pl.DataFrame(currencies, schema={"currency": pl.String, "rate_to_usd": pl.Float64},
                         orient="row"),
            zips,
        )


@dataclass(frozen=True)
class GenerateSummary:
    pushed: int
    unique_valid: int
    duplicates: int
    invalid: int
    batches: int
    seconds: float
    backpressure_seconds: float

    @property
    def rate(self) -> float:
        return self.pushed / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "orders_per_second": self.rate}


# UUIDv7 (RFC 9562): 48-bit Unix ms | version 7 | 12-bit rand_a | variant 0b10 | 62-bit rand_b.
_UUID7_VERSION = 0x7 << 76
_UUID7_VARIANT = 0b10 << 62
_UUID7_PER_MS = 1 << 12


def time_ordered_ids(count: int, now: datetime) -> list[str]:
    """`count` UUIDv7 strings (RFC 9562 section 5.7), increasing in the order returned.

    The 48-bit timestamp starts at `now` (ms) and `rand_a` is a 12-bit counter within each
    millisecond (RFC 9562 section 6.2, method 1), so ids sort in generation order; `rand_b`
    is 62 bits from the operating system's CSPRNG, never from a seeded generator, so ids from
    any two producers (any hosts, any `--seed`, even the same seed at the same instant)
    collide with probability about n**2 / 2**63.
    """
    start_ms = int(now.timestamp() * 1000)
    entropy = os.urandom(8 * count)
    ids = []
    for n in range(count):
        ms, counter = divmod(n, _UUID7_PER_MS)
        rand_b = int.from_bytes(entropy[8 * n:8 * n + 8], "big") >> 2
        value = (((start_ms + ms) << 80) | _UUID7_VERSION | (counter << 64) | _UUID7_VARIANT
                 | rand_b)
        h = f"{value:032x}"
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids


def valid_orders(refs: References, count: int, rng: random.Random, *,
                 burst: bool = False, now: datetime | None = None) -> pl.DataFrame:
    """`count` valid orders as a frame with the payload's columns.

    `rng` (seeded for reproducible contents) picks products, currencies, zip codes, times and
    quantities; the order ids are time-ordered UUIDv7s unique across producers
    (`time_ordered_ids`), whatever the seed.
    """
    if count == 0:
        return pl.DataFrame(schema=PAYLOAD_SCHEMA)
    now = now or datetime.now(UTC)
    seed = rng.randrange(2**32)
    product = refs.products.sample(count, with_replacement=True, seed=seed)
    currency = refs.currencies.sample(count, with_replacement=True, seed=seed + 1)
    zips = pl.Series(refs.zip_codes).sample(count, with_replacement=True, seed=seed + 2)
    offsets = (pl.Series([0] * count) if burst else
               pl.int_range(0, 3600, eager=True).sample(count, with_replacement=True,
                                                        seed=seed + 3))
    quantities = pl.Series([1, 1, 1, 2, 2, 3, 4, 5]).sample(count, with_replacement=True,
                                                             seed=seed + 4)
    customers = pl.int_range(1, 200_001, eager=True).sample(count, with_replacement=True,
                                                            seed=seed + 5)
    frame = pl.DataFrame({
        "order_id": time_ordered_ids(count, now),
        "customer_id": customers,
        "product_id": product["product_id"],
        "quantity": quantities,
        "base_price": product["base_price"],
        "currency": currency["currency"],
        "rate_to_usd": currency["rate_to_usd"],
        "zip_code": zips,
        "offset_s": offsets,
    })
    stamp = pl.lit(now) - pl.duration(seconds=pl.col("offset_s"))
    return frame.select(
        "order_id", "customer_id", "product_id", "quantity",
        (pl.col("base_price") / pl.col("rate_to_usd")).round(2).alias("unit_price"),
        "currency", "zip_code",
        stamp.dt.strftime("%Y-%m-%dT%H:%M:%S%.3f+00:00").alias("order_timestamp"),
    )


def to_payloads(orders: pl.DataFrame) -> list[bytes]:
    """One compact JSON object per order, as the queue carries them."""
    if orders.is_empty():
        return []
    return orders.write_ndjson().encode().splitlines()


def invalid_payload(kind: str, valid: dict[str, object], n: int) -> bytes:
    """A payload that must be rejected, of the given kind, derived from a valid order."""
    order = {**valid, "order_id": f"bad-{uuid.uuid4().hex[:10]}-{n}"}
    if kind == "bad_json":
        return json.dumps(order).encode()[:-7]
    if kind == "missing_field":
        order.pop("product_id")
    elif kind == "negative_quantity":
        order["quantity"] = -abs(int(order["quantity"]))
    elif kind == "unknown_product":
        order["product_id"] = "P-NOPE"
    elif kind == "unknown_currency":
        order["currency"] = "XXX"
    elif kind == "bad_timestamp":
        order["order_timestamp"] = "yesterday at noon"
    elif kind == "wrong_type":
        order["quantity"] = str(order["quantity"])
    elif kind == "not_utf8":
        return json.dumps(order).encode().replace(b'"ord', b'"\xff\xfeord', 1) + b"\xff"
    return json.dumps(order).encode()


def build_payloads(refs: References, count: int, *, duplicates: float = 0.0,
                   invalid: float = 0.0, burst: bool = False, seed: int | None = None
                   ) -> tuple[list[bytes], dict[str, int]]:
    """`count` payloads in queue order, with the given fractions of duplicates and invalid."""
    if not (0 <= duplicates < 1 and 0 <= invalid < 1 and duplicates + invalid < 1):
        raise ValueError("--duplicates and --invalid are fractions that sum to less than 1")
    rng = random.Random(seed)
    n_dup = round(count * duplicates)
    n_bad = round(count * invalid)
    n_valid = count - n_dup - n_bad
    orders = valid_orders(refs, n_valid, rng, burst=burst)
    payloads = to_payloads(orders)
    if n_bad:
        rows = orders.head(max(1, min(n_valid, 1000))).to_dicts() or [{
            "order_id": "x", "customer_id": 1, "product_id": "P000001", "quantity": 1,
            "unit_price": 1.0, "currency": "USD", "zip_code": "00000",
            "order_timestamp": datetime.now(UTC).isoformat()}]
        payloads += [invalid_payload(INVALID_KINDS[i % len(INVALID_KINDS)],
                                     rows[i % len(rows)], i) for i in range(n_bad)]
    if n_dup:
        if not n_valid:
            raise ValueError("duplicates need at least one valid order")
        payloads += [payloads[rng.randrange(n_valid)] for _ in range(n_dup)]
    rng.shuffle(payloads)
    return payloads, {"unique_valid": n_valid, "duplicates": n_dup, "invalid": n_bad}


def routing_id(payload: bytes) -> bytes | None:
    """The `order_id` of a payload as UTF-8 bytes, to route it to its queue shard; None for a
    payload without a readable string id (it is rejected wherever it goes)."""
    try:
        order_id = json.loads(payload).get("order_id")
    except (ValueError, AttributeError):
        return None
    return order_id.encode("utf-8", "surrogatepass") if isinstance(order_id, str) else None


def push_payloads(queue: OrderQueue, backpressure: Backpressure, payloads: list[bytes],
                  batch_size: int, *, on_progress: Callable[[int], None] | None = None,
                  on_wait: Callable[[int], None] | None = None) -> tuple[int, float]:
    """Push in batches (one signal each); returns (batches, seconds spent waiting)."""
    batches = 0
    waited = 0.0
    for start in range(0, len(payloads), batch_size):
        chunk = payloads[start:start + batch_size]
        waited += backpressure.wait_for_room(on_wait)
        if len(queue.shards) == 1:
            queue.push_batch(chunk)
        else:
            queue.push_orders(chunk, [routing_id(p) for p in chunk])
        batches += 1
        if on_progress is not None:
            on_progress(len(chunk))
    return batches, waited


def generate(queue: OrderQueue, backpressure: Backpressure, refs: References, count: int, *,
             batch_size: int, duplicates: float = 0.0, invalid: float = 0.0,
             burst: bool = False, seed: int | None = None,
             on_progress: Callable[[int], None] | None = None,
             on_wait: Callable[[int], None] | None = None) -> GenerateSummary:
    """Build and push `count` orders, `GENERATE_CHUNK` at a time so memory stays bounded."""
    started = time.perf_counter()
    totals = {"pushed": 0, "unique_valid": 0, "duplicates": 0, "invalid": 0, "batches": 0}
    waited = 0.0
    for number, start in enumerate(range(0, count, GENERATE_CHUNK)):
        payloads, mix = build_payloads(
            refs, min(GENERATE_CHUNK, count - start), duplicates=duplicates, invalid=invalid,
            burst=burst, seed=None if seed is None else seed + number)
        batches, chunk_waited = push_payloads(queue, backpressure, payloads, batch_size,
                                              on_progress=on_progress, on_wait=on_wait)
        waited += chunk_waited
        totals["batches"] += batches
        totals["pushed"] += len(payloads)
        for name, value in mix.items():
            totals[name] += value
    return GenerateSummary(totals["pushed"], totals["unique_valid"], totals["duplicates"],
                           totals["invalid"], totals["batches"], time.perf_counter() - started,
                           waited)

