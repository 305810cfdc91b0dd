"""worker.jsondecode: json.loads's results and errors, at any nesting depth (no Redis)."""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from worker import jsondecode
from worker.jsondecode import _loads_iterative, loads

Loader = Callable[[str], Any]
BOTH: list[Loader] = [loads, _loads_iterative]


# --- helpers: nothing here recurses, so they work on 100,000-deep values ---


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types (1, 1.0, True differ), NaN == NaN, -0.0 != 0.0, key order."""
    pending = [(a, b)]
    while pending:
        x, y = pending.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            if math.isnan(x) or math.isnan(y):
                if not (math.isnan(x) and math.isnan(y)):
                    return False
            elif x != y or math.copysign(1.0, x) != math.copysign(1.0, y):
                return False
        elif isinstance(x, dict):
            if list(x) != list(y):
                return False
            pending.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            pending.extend(zip(x, y, strict=True))
        elif x != y:
            return False
    return True


def depth(v: Any) -> int:
    """Nesting depth: 0 for a scalar, 1 for [] or {}."""
    deepest, pending = 0, [(v, 0)]
    while pending:
        x, d = pending.pop()
        if isinstance(x, list | dict):
            d += 1
            deepest = max(deepest, d)
            pending.extend((c, d) for c in (x.values() if isinstance(x, dict) else x))
    return deepest


def outcome(f: Loader, doc: str) -> tuple[str, Any]:
    """("ok", value) or (exception type name, (msg, pos)) — comparable between decoders."""
    try:
        return "ok", f(doc)
    except json.JSONDecodeError as e:
        return "JSONDecodeError", (e.msg, e.pos, e.lineno, e.colno)
    except ValueError as e:
        return "ValueError", str(e)


def assert_same_outcome(doc: str) -> None:
    want, got = outcome(json.loads, doc), outcome(_loads_iterative, doc)
    assert want[0] == got[0], (doc[:200], want, got)
    if want[0] == "ok":
        assert same(want[1], got[1]), doc[:200]
    else:
        assert want[1] == got[1], doc[:200]


def json_loads_unlimited(doc: str) -> Any:
    """json.loads itself on a deep doc: a raised recursion limit, on a thread with a big stack."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = json.loads(doc)
        except BaseException as e:  # handed to the test thread below
            box["error"] = e

    old_limit, old_stack = sys.getrecursionlimit(), threading.stack_size()
    sys.setrecursionlimit(1_000_000)
    threading.stack_size(512 * 1024 * 1024)
    try:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        threading.stack_size(old_stack)
        sys.setrecursionlimit(old_limit)
    if isinstance(box.get("error"), RecursionError):
        pytest.skip("this Python's json C scanner has a fixed recursion cap")
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- shallow documents: the iterative parser is json.loads ---

SHALLOW = [
    "null", "true", "false", "0", "-0", "-0.0", "0.0", "1", "-1", "123456789",
    "1" * 4000, "-" + "9" * 300, "1.5", "-1.5e10", "1E+2", "1e-2", "2.5E-300", "1e400", "-1e400",
    "0.1", "3.141592653589793", "5e-324", "1.7976931348623157e308", "123.456e-7",
    "NaN", "Infinity", "-Infinity", "[NaN,Infinity,-Infinity]",
    '""', '"abc"', '"\\"\\\\\\/\\b\\f\\n\\r\\t"', '"\\u0041\\u00e9\\u4e2d"', '"é中😀"',
    '"\\ud83d\\ude00"', '"\\ud83d"', '"\\ude00"', '"\\ud83dx"', '"\\ude00\\ud83d"',
    '"\\ud83d\\u0041"', '"\\uD83D\\uDE00"', '"\x7f\u2028\u2029"', '"\\u0000"',
    "[]", "{}", "[[]]", "[{}]", '{"a":{}}', '{"":[]}', "[ ]", "{ }", " [ \n\t\r] ", "\n{\r}\t",
    "[1,2,3]", '[1, "a", null, true, false, 1.5, [], {}]',
    '{"a":1,"b":2}', '{"b":1,"a":2}', '{"a":1,"a":2}', '{"a":1,"b":2,"a":3}',
    '{"a":[1,{"a":2}],"a":{"b":[]}}', '{"\\u00e9":1,"é":2}', '{"k\\ud83d":"v"}',
    '{ "a" : 1 , "b" : [ 1 , 2 ] }', '[[1,[2,[3,{"x":[4,{"y":null}]}]]],5]',
    json.dumps({"job": {"id": "1", "data": {"text": "é" * 50, "n": [1, 2.5, None]}}}, indent=2),
    json.dumps(["\x00\x1f", "😀", "\ud800"], ensure_ascii=False),
    "   42   ", "\t\n\r 1",
]  # fmt: skip

INVALID = [
    "", " ", "[", "{", "]", "}", "[1,]", '{"a":1,}', '{"a" 1}', '{"a"}', '{"a":}', "{1:2}",
    "{'a':1}", "[1 2]", '{"a":1 "b":2}', "[,1]", "[1,,2]", '"abc', '["abc', '"\\x"', '"\\u12"',
    '"\\u12g4"', '"a\x01b"', '"a\nb"', '"a\tb"', "01", "-", "-01", "1.", ".5", "1e", "1e+",
    "+1", "1.e5", "00", "0x10", "nul", "tru", "fals", "nan", "inf", "-inf", "-Inf", "NAN",
    "[1]x", "{} {}", "1 2", "[1] ]", "\ufeff[]", "\u00a0[]", "[\u00a0]", "[1٣]", "1٣", "٣",
    "[\x00]", "//c\n1", "[1,\n2,\n}", '{"a":1,\n"b"\n2}', "True", "None", "[-]", '{"a":-}',
]  # fmt: skip


@pytest.mark.parametrize("doc", SHALLOW + INVALID)
def test_iterative_parser_matches_json_loads_on_shallow_documents(doc: str) -> None:
    assert_same_outcome(doc)


@pytest.mark.parametrize("doc", INVALID)
def test_invalid_documents_raise_jsondecodeerror_from_both(doc: str) -> None:
    for f in BOTH:
        with pytest.raises(json.JSONDecodeError):
            f(doc)


def test_loads_on_shallow_documents_is_json_loads_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fallback(text: str) -> Any:
        raise AssertionError("fallback used on a shallow document")

    monkeypatch.setattr(jsondecode, "_loads_iterative", no_fallback)
    for doc in SHALLOW:
        assert same(loads(doc), json.loads(doc)), doc
    with pytest.raises(json.JSONDecodeError):
        loads("[1,]")


def test_int_digit_limit_is_json_loads_valueerror() -> None:
    doc = "[" + "7" * 5000 + "]"
    assert_same_outcome(doc)
    with pytest.raises(ValueError, match="4300"):
        _loads_iterative(doc)


# --- random values and random corruptions (a seeded generator: hypothesis is not a dev dep) ---


def random_str(rng: random.Random) -> str:
    pools = [(0x20, 0x7E), (0, 0x1F), (0x80, 0x7FF), (0xD800, 0xDFFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(rng.randrange(8)):
        lo, hi = pools[rng.randrange(len(pools))] if rng.random() < 0.4 else pools[0]
        c = chr(rng.randint(lo, hi))
        if out and "\ud800" <= out[-1] <= "\udbff" and "\udc00" <= c <= "\udfff":
            out.append("-")  # a high+low pair of str code points would decode as one character
        out.append(c)
    return "".join(out)


def random_scalar(rng: random.Random) -> Any:
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(10**30), 10**30)
    if kind == 2:
        return rng.randint(-1000, 1000)
    if kind == 3:
        return rng.choice([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1e308])
    if kind == 4:
        return rng.uniform(-1e6, 1e6)
    if kind == 5:
        return rng.random() * 10.0 ** rng.randint(-300, 300) * rng.choice([1, -1])
    return random_str(rng)


def random_value(rng: random.Random, max_nodes: int = 40) -> Any:
    """A nested JSON-able value, built with an explicit stack."""
    root: list[Any] = []
    open_: list[list[Any] | dict[str, Any]] = [root]
    for _ in range(rng.randrange(1, max_nodes)):
        parent = rng.choice(open_)
        r = rng.random()
        child: Any = [] if r < 0.2 else {} if r < 0.4 else random_scalar(rng)
        if isinstance(parent, list):
            parent.append(child)
        else:
            parent[random_str(rng) if rng.random() < 0.8 else "dup"] = child
        if isinstance(child, list | dict):
            open_.append(child)
    return root[0] if root and rng.random() < 0.7 else root


def random_dumps(rng: random.Random, v: Any) -> str:
    return json.dumps(
        v,
        ensure_ascii=rng.random() < 0.5,
        indent=rng.choice([None, None, 0, 2, "\t"]),
        separators=rng.choice([None, (",", ":"), (" , ", " : ")]),
    )


def test_random_values_round_trip() -> None:
    rng = random.Random(20240611)
    for _ in range(1500):
        v = random_value(rng)
        doc = random_dumps(rng, v)
        assert same(_loads_iterative(doc), v), doc
        assert same(_loads_iterative(doc), json.loads(doc)), doc


def test_random_corruptions_give_json_loads_errors() -> None:
    rng = random.Random(7)
    alphabet = '[]{}:,"\\ \n01-+.eEtrufalsnNI\x01é'
    for _ in range(3000):
        doc = random_dumps(rng, random_value(rng, 15))
        chars = list(doc)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(chars) + 1)
            op = rng.randrange(3)
            if op == 0 and i < len(chars):
                del chars[i]
            elif op == 1 and i < len(chars):
                chars[i] = rng.choice(alphabet)
            else:
                chars.insert(i, rng.choice(alphabet))
        assert_same_outcome("".join(chars))


# --- deep documents ---


def test_deep_arrays() -> None:
    for n in (10_000, 100_000):
        doc = "[" * n + "]" * n
        for f in BOTH:
            v = f(doc)
            assert depth(v) == n
            for _ in range(n - 1):
                assert isinstance(v, list) and len(v) == 1
                v = v[0]
            assert v == []


def test_deep_objects() -> None:
    n = 20_000
    doc = '{"a":' * n + '"leaf"' + "}" * n
    for f in BOTH:
        v = f(doc)
        assert depth(v) == n
        for _ in range(n):
            assert isinstance(v, dict) and list(v) == ["a"]
            v = v["a"]
        assert v == "leaf"


def test_deep_mixed_with_siblings_matches_json_loads_without_a_limit() -> None:
    n = 5_000
    opens = "".join('[1,"x",{"k":null,"v":' if i % 2 else '{"a":[],"a":2,"b":' for i in range(n))
    closes = "".join("}]" if i % 2 else "}" for i in reversed(range(n)))
    doc = " " + opens.replace(",", " ,\n ") + "-1.5e3" + closes + " \n"
    got = loads(doc)
    assert same(got, _loads_iterative(doc))
    assert depth(got) == n + n // 2  # each odd level is a list holding a dict
    assert same(got, json_loads_unlimited(doc))
    assert list(got) == ["a", "b"] and got["a"] == 2


def test_deep_invalid_documents_raise_at_json_loads_position() -> None:
    n = 5_000
    deep = "[" * n + "]" * n
    cases = {
        "[" * n + "1,]" + "]" * (n - 1): "Expecting value",  # trailing comma
        '{"a":' * n + '{"b" 1}' + "}" * n: "Expecting ':' delimiter",
        "[" * n + '"abc' + "]" * n: "Unterminated string starting at",
        "[" * n + '"a\x01b"' + "]" * n: "Invalid control character at",
        "[" * n + "01" + "]" * n: "Expecting ',' delimiter",  # leading zero
        "[" * n + "]" * (n - 1): "Expecting ',' delimiter",  # unclosed
        deep + " x": "Extra data",
        deep + "]": "Extra data",
        '{"a":' * n + "[1,2}" + "}" * n: "Expecting ',' delimiter",
    }
    for doc, msg in cases.items():
        want = outcome(json_loads_unlimited, doc)
        for f in BOTH:
            got = outcome(f, doc)
            assert got[0] == "JSONDecodeError" and got[1][0] == msg, (msg, got[1][:2])
            assert got == want, (msg, got[1], want[1])


def test_deep_parse_is_fast() -> None:
    arrays = "[" * 100_000 + "]" * 100_000
    objects = '{"a":' * 50_000 + "1" + "}" * 50_000
    for doc in (arrays, objects):
        t0 = time.perf_counter()
        loads(doc)
        assert time.perf_counter() - t0 < 1.0


def test_the_iterative_parser_does_not_recurse() -> None:
    doc = '[{"a":' * 20_000 + '"s"' + "}]" * 20_000
    frame, here = sys._getframe(), 0
    while frame is not None:
        here += 1
        frame = frame.f_back  # type: ignore[assignment]
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(here + 20)
    try:
        v = _loads_iterative(doc)
    finally:
        sys.setrecursionlimit(old)
    assert depth(v) == 40_000
