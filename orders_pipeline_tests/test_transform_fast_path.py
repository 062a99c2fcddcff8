"""The vectorised Polars parse must agree exactly with the strict per-row parser.

`parse_payloads` sends plainly well-formed lines through `pl.read_ndjson` and everything
else through `_parse_one`; whichever path a payload takes, the typed values or the reject
reason must be the ones the per-row reference gives.
"""

import json
import math

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from orders_pipeline import transform

ASCII_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
VALUES = st.one_of(
    ASCII_TEXT, st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=2), st.text(max_size=5),
)
GOOD = {
    "order_id": ASCII_TEXT.filter(bool), "customer_id": st.integers(1, 10**9),
    "product_id": st.sampled_from(["P000001", "P000002"]),
    "quantity": st.integers(-3, 10), "unit_price": st.floats(0, 1e6, allow_nan=False),
    "currency": st.sampled_from(["USD", "EUR"]), "zip_code": st.sampled_from(["02134"]),
    "order_timestamp": st.sampled_from(["2026-11-22T10:00:00+01:00", "2026-11-22T09:00:00Z"]),
}


@st.composite
def payload(draw: st.DrawFn) -> bytes:
    """Mostly valid orders, with fields dropped, retyped, repeated or spaced oddly."""
    order: dict[str, object] = {name: draw(strategy) for name, strategy in GOOD.items()}
    for name in draw(st.lists(st.sampled_from(list(GOOD)), max_size=2)):
        if draw(st.booleans()):
            order.pop(name, None)
        else:
            order[name] = draw(VALUES)
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]))
    text = json.dumps(order, separators=separators)
    if draw(st.booleans()):  # a repeated key, which json.dumps cannot write itself
        name = draw(st.sampled_from(list(GOOD)))
        text = text[:-1] + f', "{name}": {json.dumps(draw(VALUES))}' + "}"
    return text.encode()


def reference(payloads: list[bytes]) -> tuple[dict[int, tuple], dict[int, str]]:
    rows: dict[int, tuple] = {}
    reasons: dict[int, str] = {}
    for position, raw in enumerate(payloads):
        try:
            parsed = transform._parse_one(raw)
        except transform._PayloadError as exc:
            reasons[position] = str(exc)
            continue
        rows[position] = tuple(float(v) if n == "unit_price" else v
                               for n, v in parsed.items())
    return rows, reasons


def _same(a: tuple, b: tuple) -> bool:
    return all(x == y or (isinstance(x, float) and math.isclose(x, y, rel_tol=0, abs_tol=0))
               for x, y in zip(a, b, strict=True))


@settings(max_examples=300, deadline=None)
@given(st.lists(payload(), min_size=1, max_size=40))
def test_fast_and_strict_parsers_agree(payloads: list[bytes]) -> None:
    parsed = transform.parse_payloads(payloads)
    rows = {r[0]: r[1:] for r in parsed.rows.select(
        "batch_position", *transform.FIELDS).iter_rows()}
    reasons = dict(zip(parsed.rejects["batch_position"].to_list(),
                       parsed.rejects["reason"].to_list(), strict=True))
    expected_rows, expected_reasons = reference(payloads)
    assert reasons == expected_reasons
    assert rows.keys() == expected_rows.keys()
    for position, values in rows.items():
        assert _same(values, expected_rows[position]), (payloads[position], values)


def test_clean_batch_takes_the_vectorised_path() -> None:
    line = json.dumps({"order_id": "a-1", "customer_id": 7, "product_id": "P000001",
                       "quantity": 2, "unit_price": 9.5, "currency": "USD",
                       "zip_code": "02134", "order_timestamp": "2026-11-22T10:00:00Z"},
                      separators=(",", ":")).encode()
    fast, slow = transform._fast_rows([line, line.replace(b'"a-1"', b"17"), b"not json"])
    assert fast is not None and fast["batch_position"].to_list() == [0]
    assert slow == [1, 2]
    assert fast.schema["customer_id"] == pl.Int64
