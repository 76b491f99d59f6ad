"""`_fast/auditentry.plain_details`: an audit entry's details written from the body's text, without decoding it.

Whatever body it is given, it answers None (the caller decodes and builds the details) or exactly the
sorted-key JSON the general path makes: `McpDetails.build`'s decoding and `_message_details`, encoded as
`prepare` encodes them. Bodies come as clients write them (any spacing, key order, nesting, every JSON
type), cut or spliced (not JSON), and with what it must leave to the general path (floats orjson would write
otherwise, -0, escapes, text that is not UTF-8, duplicate keys, big integers)."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._fast import auditentry
from gateway.records import chain
from gateway.records.audit import _message_details

pytestmark = pytest.mark.skipif(not auditentry.COMPILED, reason="the twin always leaves it to the general path")
plain_details = auditentry.implementation.plain_details


def general_path(body: bytes, status: int, server: str | None, error: str | None) -> bytes | None:
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(message) is not dict:
        return None
    details = {"status": status}
    if server is not None:
        details["server"] = server
    if error:
        details["error"] = error
    _message_details(message, details)
    return orjson.dumps(details, option=orjson.OPT_SORT_KEYS)


KEYS = st.sampled_from(["a", "b", "name", "arguments", "_meta", "params", "id", "method", "error", "Z", "a_b", "",
                        "a\n", "aZ", 'a"', "a\\", "a\t", "a/"])  # escaped keys sort by their characters
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**18) + 1, 10**18 - 1), st.integers(), st.floats(allow_nan=False),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8), st.text(max_size=4),
)
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=16)
MESSAGES = st.fixed_dictionaries(
    {}, optional={"jsonrpc": st.just("2.0"), "id": LEAVES, "method": st.sampled_from(["tools/call", "ping"]) | LEAVES,
                  "params": VALUES, "error": VALUES, "result": VALUES},
)


@st.composite
def bodies(draw) -> bytes:
    message = draw(MESSAGES | VALUES)
    spacing = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
    text = json.dumps(message, separators=spacing, ensure_ascii=draw(st.booleans()),
                      indent=draw(st.none() | st.just(2)), sort_keys=draw(st.booleans()))
    raw = (" " * draw(st.integers(0, 2)) + text + "\r\n" * draw(st.integers(0, 1))).encode("utf-8", "surrogatepass")
    change = draw(st.sampled_from(["none", "none", "cut", "splice", "duplicate"]))
    if change == "cut" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif change == "splice":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b",", b"}", b"]", b'"', b"0", b"-0", b"01", b"1.0", b"1e5", b"\\",
                                               b"tru", b"nul", b" ", b"{}", b'"a":1,', b"\xc3", b"\x80",
                                               b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe0\x80\xaf",
                                               "\u00e9\u65e5\U0001f600".encode()])) + raw[at:]
    elif change == "duplicate" and raw.startswith(b"{") and len(raw) > 2:
        raw = b'{"id":1,"id":2,' + raw[1:]
    return raw


@settings(max_examples=3000, deadline=None)
@given(body=bodies(), status=st.sampled_from([200, 403, 502, 0, -1, 2**40]),
       server=st.none() | st.sampled_from(["bench", "caf\u00e9", 'q"uote']), error=st.none() | st.sampled_from(
           ["", "Forbidden: no", "line\nbreak"]))
def test_the_details_are_the_general_paths_or_none(body, status, server, error):
    written = plain_details(body, status, server, error)
    assert written is None or written == general_path(body, status, server, error)


CALLS = [
    # The benchmark's call; a modern one with _meta; every JSON type, nested, any spacing and order.
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"}}}',
    b'{"jsonrpc":"2.0","id":"r-7","method":"tools/call","params":{"_meta":{"progressToken":3},"name":"search",'
    b'"arguments":{"query":"retry budget","limit":20,"filters":{"since":"2026-01-01","tags":["a","b"]}}}}',
    b' {\n  "method" : "resources/read",\n  "params" : { "uri" : "file:///a.txt" , "z" : [ ] , "y" : { } },\n'
    b'  "id" : 12345678901234 , "jsonrpc" : "2.0"\n} ',
    b'{"method":"notifications/initialized","jsonrpc":"2.0"}',
    b'{"jsonrpc":"2.0","id":4,"error":{"code":-32601,"message":"nope"}}',
    b'{"method":"x","params":{"b":true,"a":false,"c":null,"d":-12,"e":0}}',
    # Past ASCII, copied as its UTF-8 (orjson writes it so), keys in code point order.
    '{"method":"x","params":{"q":"caf\u00e9","\u65e5":"\u672c","e":"\U0001f600","\u00e9":"\u2028"}}'.encode(),
    # The escapes orjson writes as they are read.
    b'{"method":"x","params":{"content":"# a\\n\\n- b\\tc\\r\\n","q":"a\\"b","p":"C:\\\\x","z":"\\b\\f"}}',
    # Floats as clients write them: a sampling temperature, coordinates, a price, a threshold.
    b'{"method":"tools/call","params":{"name":"generate","arguments":{"prompt":"hi","temperature":0.7,'
    b'"top_p":0.95,"max_tokens":256}}}',
    b'{"method":"tools/call","params":{"name":"weather","arguments":{"lat":37.7749,"lon":-122.4194}}}',
    b'{"method":"x","params":{"price":19.99,"ratio":0.0001,"big":123456789012.345,"d":[0.5,-0.25,3.14159]}}',
]


@pytest.mark.parametrize("body", CALLS)
def test_ordinary_calls_are_written_here(body):
    assert plain_details(body, 200, "bench", None) == general_path(body, 200, "bench", None) is not None
    assert plain_details(body, 403, None, "Forbidden: tool") == general_path(body, 403, None, "Forbidden: tool")


@pytest.mark.parametrize("body", [
    b'{"method":"x","id":-0}', b'{"method":"x","id":1e3}',
    b'{"method":"x","params":{"q":"a\\/b"}}', b'{"method":"x","params":{"q":"\\u0041"}}',  # orjson writes "/", "A"
    b'{"method":"x","params":{"a\\n":1,"aZ":2}}',  # a key with an escape: its bytes do not sort as it does
    b'{"method":"x","params":{"q":"a\x01b"}}', b'{"method":"x","params":{"q":"a\\x"}}',
    # Bytes that are no UTF-8 orjson reads: cut short, a stray continuation, overlong, a surrogate, past U+10FFFF.
    b'{"method":"x","params":{"q":"\xc3"}}', b'{"method":"x","params":{"q":"\x80"}}',
    b'{"method":"x","params":{"q":"\xc0\xaf"}}', b'{"method":"x","params":{"q":"\xe0\x80\xaf"}}',
    b'{"method":"x","params":{"q":"\xed\xa0\x80"}}', b'{"method":"x","params":{"q":"\xf4\x90\x80\x80"}}',
    b'{"method":"x","params":{"q":"\xf8\x88\x80\x80\x80"}}', b'{"method":"x","params":{"q":"\xe6\x97"}}',
    b'{"method":"x","params":{"q":"\xe6\x97a"}}', b'{"method":"x","params":{"q":"\xf0\x9f\x98a"}}',
    b'{"id":1,"id":2}', b'{"method":"x","params":{"a":1,"a":1}}', b'{"id":1234567890123456789}',
    b'[{"method":"x"}]', b'"x"', b'{"method":"x"}{}', b'{"method":"x",}', b'{"method":"x"', b"",
    b'{"method":"x","params":{"a":[1,]}}', b"{'method':'x'}", b'{"method":NaN}',
])
def test_what_it_leaves_to_the_general_path(body):
    assert plain_details(body, 200, "bench", None) is None


# Number tokens written as people and programs write them: what orjson writes back differs for some (an
# exponent, trailing zeros, a whole value, more digits than a double keeps), and only those must be left.
NUMBER_TEXTS = st.builds(
    lambda sign, whole, zeros, digits, tail: f"{sign}{whole}.{'0' * zeros}{digits}{tail}",
    st.sampled_from(["", "-"]),
    st.sampled_from(["0", "1", "9", "10", "37", "999999", "123456789012", "1234567890123456", "900719925474099"]),
    st.integers(0, 6), st.integers(0, 10**18).map(str), st.sampled_from(["", "", "0", "00", "e5", "E-3", "e+2"]),
)


@settings(max_examples=3000, deadline=None)
@given(number=NUMBER_TEXTS | st.floats(allow_nan=False, allow_infinity=False).map(repr)
       | st.floats(-1e6, 1e6).map(lambda v: f"{v:.6f}"))
def test_a_float_is_copied_only_where_orjson_writes_the_same_text(number):
    body = b'{"method":"x","params":{"v":' + number.encode() + b',"w":[' + number.encode() + b"]}}"
    written = plain_details(body, 200, None, None)
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        assert written is None
        return
    assert written is None or written == general_path(body, 200, None, None)
    if written is not None:
        # DetailsText's text is taken as the canonical text (records/chain.py): no whole float, as stored.
        assert chain.canonical_details(written.decode()) == written.decode()
        assert not auditentry.may_hold_whole_float(written)


@pytest.mark.parametrize("number", ["0.7", "-0.5", "0.95", "37.7749", "-122.4194", "19.99", "0.0001", "3.14159",
                                    "123456789012.345", "0.000123456789012345", "99999999999999.9"])
def test_floats_with_few_digits_are_copied(number):
    body = b'{"method":"x","params":{"v":' + number.encode() + b"}}"
    assert plain_details(body, 200, None, None) == b'{"method":"x","params":{"v":' + number.encode() + \
        b'},"status":200}' == general_path(body, 200, None, None)


@pytest.mark.parametrize("number", ["2.0", "-0.0", "0.50", "1.10", "0.00001", "1e5", "1.5e3", "1.5E-3",
                                    "0.1234567890123456", "1234567890.1234567", "99999999999999.99"])
def test_floats_orjson_may_write_otherwise_are_left(number):
    assert plain_details(b'{"method":"x","params":{"v":' + number.encode() + b"}}", 200, None, None) is None
