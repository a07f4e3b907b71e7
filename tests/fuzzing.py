"""Hypothesis strategies that turn a valid document (recipe, calibration set, manifest, report.json) into a hostile
one: values of the wrong type, out of range, NaN and infinity, huge numbers, unicode and control characters,
deep nesting, missing and extra keys; and text-level damage for YAML (truncation, stray characters, a line
given twice). Used by tests/test_fuzz.py.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterator

from hypothesis import strategies as st

NASTY_STRINGS = ["", " ", "\n", "line\nbreak", "\u2028", "\x00", "\x1b[31m", "é", "💥", "名前", "../../etc/passwd",
                 "/etc/passwd", "sys/etc/hostname", "0" * 64, "nan", "-1", "1e999", "~", "null", "!!python/object",
                 "a" * 300, "{}", "[]", "\udfff"]
SPECIAL_NUMBERS = [0, -1, 1, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63), 10 ** 30, 0.5, -0.5, 1e-300, 1e300, -1e300,
                   math.inf, -math.inf, math.nan, 4096, 4097, 1_000_000_001]

scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(SPECIAL_NUMBERS), st.integers(), st.floats(),
    st.sampled_from(NASTY_STRINGS), st.text(max_size=12))


def nested(depth: int, leaf: Any = 1) -> Any:
    """[[[...leaf...]]] `depth` levels deep."""
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


values = st.one_of(
    scalars,
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=6),
    st.integers(20, 150).map(nested),  # deep, but within what json/yaml writers of the test can serialise
)


def paths(doc: Any, prefix: tuple = (), depth: int = 0) -> Iterator[tuple]:
    """Paths (tuples of keys and indices) to every value in `doc`; long lists are sampled at their ends."""
    if depth > 14:
        return
    if isinstance(doc, dict):
        items: Any = doc.items()
    elif isinstance(doc, list):
        idx = sorted({0, 1, len(doc) - 2, len(doc) - 1} & set(range(len(doc))))
        items = [(i, doc[i]) for i in idx]
    else:
        return
    for key, value in items:
        yield prefix + (key,)
        yield from paths(value, prefix + (key,), depth + 1)


def _parent(doc: Any, path: tuple) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


@st.composite
def mutated(draw: st.DrawFn, doc: Any, max_mutations: int = 3) -> Any:
    """`doc` with 1..max_mutations of: replace a value, delete a key or item, add an extra key or item, push a
    number past its range, or replace the whole document."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, max_mutations))):
        found = list(paths(doc))
        if not found or draw(st.integers(0, 40)) == 0:
            doc = draw(values)
            continue
        path = draw(st.sampled_from(found))
        parent, key = _parent(doc, path), path[-1]
        op = draw(st.sampled_from(["replace", "replace", "number", "delete", "extra"]))
        if op == "replace":
            parent[key] = draw(values)
        elif op == "number":
            old = parent[key]
            scale = [old * 10, -old, old + 1] if isinstance(old, (int, float)) and not isinstance(old, bool) else []
            parent[key] = draw(st.sampled_from(SPECIAL_NUMBERS + scale))
        elif op == "delete":
            del parent[key]
        elif isinstance(parent[key], dict):
            parent[key][draw(st.sampled_from(NASTY_STRINGS[:12]) | st.text(max_size=8))] = draw(values)
        elif isinstance(parent[key], list):
            parent[key].append(draw(values))
        else:
            parent[key] = draw(values)
    return doc


@st.composite
def damaged_text(draw: st.DrawFn, text: str) -> str:
    """YAML text with text-level damage: a line given twice, truncated, stray characters, broken indentation."""
    lines = text.splitlines(keepends=True)
    op = draw(st.sampled_from(["none", "none", "duplicate", "truncate", "insert", "indent", "deep"]))
    if op == "duplicate" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        lines.insert(i + 1, lines[i])
    elif op == "truncate" and text:
        return text[:draw(st.integers(0, len(text) - 1))]
    elif op == "insert":
        i = draw(st.integers(0, len(text)))
        return text[:i] + draw(st.sampled_from([":", "- ", "[", "{", "'", '"', "&a ", "*a", "!!float ", "\t", "%", "@",
                                                "\x00", "\ufeff", "? "])) + text[i:]
    elif op == "indent" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = " " * draw(st.integers(1, 3)) + lines[i]
    elif op == "deep":
        depth = draw(st.integers(100, 1200))
        lines.append(f"extra: {'[' * depth}{']' * depth}\n")
    return "".join(lines)
