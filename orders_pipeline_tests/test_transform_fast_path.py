"""The verdict on a payload depends on its bytes alone (DESIGN.md "Value rules").

`parse_payloads` sends plainly well-formed lines through `pl.read_ndjson` and everything
else through the strict per-row parser. Whichever path a payload takes, and whatever else
is in its batch (junk lines, repeated keys, escapes, non-ASCII, other copies of its id),
its verdict (the reject reason, or the typed values after the value rules) must equal the
verdict the strict parser gives it alone.
"""

import json

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from orders_pipeline import contract, transform

ASCII_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
ANY_TEXT = st.text(max_size=6)
VALUES = st.one_of(
    ASCII_TEXT, st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=2), ANY_TEXT,
    st.decimals(allow_nan=False, allow_infinity=False, places=6),
)
PRICES = st.one_of(st.floats(0, 1e6, allow_nan=False), st.integers(0, 10**11),
                   st.decimals(0, 10**11, places=5, allow_nan=False))
GOOD = {
    "order_id": st.one_of(ASCII_TEXT.filter(bool), ANY_TEXT.filter(bool)),
    "customer_id": st.integers(-1, 2**63),
    "product_id": st.sampled_from(["P000001", "P000002"]),
    "quantity": st.integers(-3, 10**6 + 2), "unit_price": PRICES,
    "currency": st.sampled_from(["USD", "EUR"]), "zip_code": st.sampled_from(["02134"]),
    "order_timestamp": st.sampled_from(["2026-11-22T10:00:00+01:00", "2026-11-22T09:00Z",
                                        "2026-11-22T09:00:00,5-0330", "2026-1-2T09:00:00Z",
                                        "2026-11-22T09:00:60Z", "2026-11-22T09:00:00+05"]),
}


def _number(value: object) -> str:
    return str(value) if not isinstance(value, float) else repr(value)


@st.composite
def payload(draw: st.DrawFn) -> bytes:
    """Mostly valid orders, with fields dropped, retyped, repeated, escaped or spaced oddly."""
    order: dict[str, object] = {name: draw(strategy) for name, strategy in GOOD.items()}
    for name in draw(st.lists(st.sampled_from(list(GOOD)), max_size=2)):
        if draw(st.booleans()):
            order.pop(name, None)
        else:
            order[name] = draw(VALUES)
    if draw(st.booleans()):
        order["note"] = draw(st.sampled_from(["é", "line\nbreak", "x"]))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]))
    text = json.dumps(order, separators=separators, default=_number,
                      ensure_ascii=draw(st.booleans()))
    # json.dumps writes a Decimal through `default` as a string: write it as a number.
    for name, value in order.items():
        if not isinstance(value, (str, int, float, bool, list, type(None))):
            text = text.replace(f'"{name}"{separators[1]}"{value}"',
                                f'"{name}"{separators[1]}{value}')
    if draw(st.booleans()):  # a repeated key, which json.dumps cannot write itself
        name = draw(st.sampled_from([*GOOD, "note"]))
        text = text[:-1] + f', "{name}": {json.dumps(draw(VALUES), default=_number)}' + "}"
    raw = text.encode()
    return draw(st.sampled_from([raw, raw, raw, raw + b" x", raw[:-1], b"\xff" + raw]))


def verdicts(payloads: list[bytes]) -> dict[int, object]:
    """Position -> reject reason, or the typed values the value rules produced."""
    parsed = transform.parse_payloads(payloads)
    valid, invalid = transform.validate_values(parsed.rows)
    out: dict[int, object] = dict(zip(parsed.rejects["batch_position"].to_list(),
                                      parsed.rejects["reason"].to_list(), strict=True))
    out.update(zip(invalid["batch_position"].to_list(), invalid["reason"].to_list(),
                   strict=True))
    for row in valid.select("batch_position", *contract.FIELD_NAMES).iter_rows():
        out[row[0]] = row[1:]
    return out


def strict_verdict(raw: bytes) -> object:
    """The strict per-row parser alone, then the same value rules."""
    try:
        parsed = transform._parse_one(raw)
    except transform._PayloadError as exc:
        return str(exc)
    frame = pl.DataFrame({"batch_position": [0], **{k: [v] for k, v in parsed.items()}},
                         schema={"batch_position": pl.Int32, **contract.RAW_SCHEMA})
    return verdicts_of_rows(frame)


def verdicts_of_rows(frame: pl.DataFrame) -> object:
    valid, invalid = transform.validate_values(frame)
    if invalid.height:
        return invalid["reason"][0]
    return valid.select(*contract.FIELD_NAMES).row(0)


@settings(max_examples=300, deadline=None)
@given(st.lists(payload(), min_size=1, max_size=30))
def test_verdict_is_a_function_of_the_payload_bytes(payloads: list[bytes]) -> None:
    in_batch = verdicts(payloads)
    assert sorted(in_batch) == list(range(len(payloads)))  # one verdict per payload
    for position, raw in enumerate(payloads):
        assert in_batch[position] == strict_verdict(raw), raw
        assert verdicts([raw])[0] == in_batch[position], raw


VALID = {"order_id": "a-1", "customer_id": 7, "product_id": "P000001", "quantity": 2,
         "unit_price": 9.5, "currency": "USD", "zip_code": "02134",
         "order_timestamp": "2026-11-22T10:00:00Z"}


def test_repeated_unknown_key_is_rejected_beside_valid_and_junk_neighbours() -> None:
    """The issue's example: the verdict was "accepted" in a clean batch, "rejected" beside junk."""
    body = json.dumps(VALID, separators=(",", ":"))
    repeated = (body[:-1] + ',"note":"x","note":"y"}').encode()
    junk = (body[:-1].replace("a-1", "a-2") + "} x").encode()
    clean = verdicts([repeated, json.dumps({**VALID, "order_id": "a-3"}).encode()])
    mixed = verdicts([repeated, junk])
    assert clean[0] == mixed[0] == "invalid JSON: duplicate key"
    assert mixed[1].startswith("invalid JSON: Extra data")


def test_clean_batch_takes_the_vectorised_path() -> None:
    line = json.dumps(VALID, separators=(",", ":")).encode()
    fast, slow = transform._fast_rows([line, line.replace(b'"a-1"', b"17"), b"not json",
                                       line.replace(b"9.5", b"9.5e0")])
    assert fast is not None and fast["batch_position"].to_list() == [0]
    assert slow == [1, 2, 3]
    assert fast.schema["customer_id"] == pl.Int64
    assert fast["unit_price"].to_list() == ["9.5"]  # the literal, never a float


# Printable ASCII and DEL: what a usual line's strings may hold, plus the brackets, quotes
# and backslashes that must send a line to the general check or the strict parser.
USUAL_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=127), max_size=10)
USUAL_VALUES = {
    "order_id": USUAL_TEXT, "customer_id": st.integers(-5, 10**18 - 1),  # 18 digits at most
    "product_id": st.sampled_from(["P000001", "P000002", "P9"]),
    "quantity": st.integers(-2, 10**6 + 1),
    "unit_price": st.from_regex(r"\A-?(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?\Z"),
    "currency": st.sampled_from(["USD", "EUR", "usd"]), "zip_code": st.just("02134"),
    "order_timestamp": st.sampled_from(["2026-11-22T10:00:00+01:00", "2026-11-22T09:00Z",
                                        "2026-02-30T09:00Z", "2026-11-22 09:00Z"]),
}
# JSON literals of the wrong type or form for some field, or right but unusual.
ODD_LITERALS = st.sampled_from([
    "01", "-0", "1e2", "1E+2", "1.5e-3", "1.0", "9223372036854775808", "-9223372036854775809",
    "123456789012345678", "1234567890123456789", "true", "null", '"5"', "[1]", '{"a":1}',
    '"\\u00e9"', '"\\ud800"', '"a\\"b"', '"\\\\"', '"é"', "NaN", "-", "1.", ".5", '""', "[]",
])


@st.composite
def near_usual_line(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A line of exactly the contract's members, maybe one changed; True if it is usual.

    Changes: a field's literal swapped for an odd one, a member renamed to an unknown key
    or to another field's key (a repeat with one field missing), tabs or none of the spaces.
    """
    literals = {name: json.dumps(draw(strategy)) if name != "unit_price" else draw(strategy)
                for name, strategy in USUAL_VALUES.items()}
    keys = list(draw(st.permutations(list(literals))))
    change = draw(st.sampled_from(["none", "none", "literal", "rename", "repeat"]))
    if change == "literal":
        literals[draw(st.sampled_from(keys))] = draw(ODD_LITERALS)
    members = [(key, literals[key]) for key in keys]
    if change in ("rename", "repeat"):
        at = draw(st.integers(0, len(members) - 1))
        other = "note" if change == "rename" else draw(st.sampled_from(
            [k for k in keys if k != members[at][0]]))
        members[at] = (other, members[at][1])
    space = draw(st.sampled_from(["", " ", "  ", "\t"]))
    body = f"{space},{space}".join(f'"{k}"{space}:{space}{v}' for k, v in members)
    line = f"{space}{{{space}{body}{space}}}{space}"
    strings = [v for k, v in members if USUAL_VALUES[k] is not USUAL_VALUES["unit_price"]
               and v.startswith('"')] if change == "none" else []
    usual = change == "none" and space != "\t" and not any(
        c in v[1:-1] for v in strings for c in '{}[]\\"')
    return line.encode(), usual


@settings(max_examples=300, deadline=None)
@given(st.lists(near_usual_line(), min_size=1, max_size=20))
def test_usual_lines_take_one_pass_and_keep_their_verdict(lines: list[tuple[bytes, bool]]
                                                          ) -> None:
    """The one-pattern check (`_USUAL_LINE`) vouches only for lines `read_ndjson` reads as the
    strict parser does: beside any neighbours each line gets the strict parser's verdict,
    and every usual line is read by the vectorised path."""
    payloads = [raw for raw, _ in lines]
    in_batch = verdicts(payloads)
    fast, _ = transform._fast_rows(payloads)
    taken = set() if fast is None else set(fast["batch_position"].to_list())
    for position, (raw, usual) in enumerate(lines):
        assert in_batch[position] == strict_verdict(raw), raw
        if usual:
            assert position in taken, raw


def test_price_too_large_and_too_fine_gets_the_same_reason_on_both_paths() -> None:
    """100000000000.00001 breaks the places rule first (rule order), also where the strict
    parser reads it (here because of an escape), not only where `read_ndjson` does."""
    line = json.dumps({**VALID, "unit_price": "@"}, separators=(",", ":")).replace(
        '"@"', "100000000000.00001")
    escaped = line.replace('"a-1"', '"a\\u002d2"')
    assert verdicts([line.encode(), escaped.encode()]) == {
        0: contract.UNIT_PRICE_PLACES, 1: contract.UNIT_PRICE_PLACES}
    assert strict_verdict(escaped.encode()) == contract.UNIT_PRICE_PLACES
