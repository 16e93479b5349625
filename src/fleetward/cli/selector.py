"""kubectl's label-selector syntax (`-l`) turned into a LabelSelector object.

The kubernetes client can send a selector string with a list request, but a KillSwitch's
scope holds the structured form (matchLabels + matchExpressions), so the string is parsed
here. The grammar is kubectl's: terms joined by commas, each one of `key=value`,
`key==value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`, `key` (exists) and `!key`
(does not exist). A term that is none of these is an error naming it: a selector that
silently matched nothing would engage a switch that stops no agent.
"""

from __future__ import annotations

import re
from typing import Any

from fleetward.api.base import LABEL_KEY, LABEL_KEY_HELP, LABEL_VALUE, LABEL_VALUE_HELP


class SelectorError(ValueError):
    pass


_SET_TERM = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQUALITY_TERM = re.compile(r"^(?P<key>[^=!\s]+)\s*(?P<op>==|=|!=)\s*(?P<value>\S*)$")


def _terms(text: str) -> list[str]:
    """Split on the commas that are not inside a set's parentheses."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError("a ')' without its '('")
        elif ch == "," and depth == 0:
            terms.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise SelectorError("a '(' without its ')'")
    terms.append(text[start:].strip())
    return terms


def _key(key: str, term: str) -> str:
    if len(key) > 317 or not re.match(LABEL_KEY, key):
        raise SelectorError(f"{term!r}: {key!r} is not a label key ({LABEL_KEY_HELP})")
    return key


def _value(value: str, term: str) -> str:
    if len(value) > 63 or not re.match(LABEL_VALUE, value):
        raise SelectorError(f"{term!r}: {value!r} is not a label value ({LABEL_VALUE_HELP})")
    return value


def parse_label_selector(text: str) -> dict[str, Any]:
    """`tier=payments,env in (prod,staging),!canary` -> {"matchLabels": {...},
    "matchExpressions": [...]} (only the parts used); raises SelectorError naming the term."""
    labels: dict[str, str] = {}
    expressions: list[dict[str, Any]] = []
    for term in _terms(text):
        if not term:
            raise SelectorError(f"{text!r}: an empty term (two commas in a row, or one at an end)")
        if m := _SET_TERM.match(term):
            values = [_value(v.strip(), term) for v in m["values"].split(",")]
            if not any(values):
                raise SelectorError(f"{term!r}: '{m['op']}' needs at least one value")
            op = "In" if m["op"] == "in" else "NotIn"
            expressions.append({"key": _key(m["key"], term), "operator": op, "values": values})
        elif m := _EQUALITY_TERM.match(term):
            key, value = _key(m["key"], term), _value(m["value"], term)
            if m["op"] == "!=":
                expressions.append({"key": key, "operator": "NotIn", "values": [value]})
            elif labels.get(key, value) != value:
                raise SelectorError(f"{term!r}: {key} is already required to be {labels[key]!r}")
            else:
                labels[key] = value
        elif term.startswith("!"):
            expressions.append({"key": _key(term[1:].strip(), term), "operator": "DoesNotExist"})
        elif " " not in term:
            expressions.append({"key": _key(term, term), "operator": "Exists"})
        else:
            raise SelectorError(f"{term!r}: expected key=value, key!=value, key in (a,b), key notin (a,b), key or !key")
    selector: dict[str, Any] = {}
    if labels:
        selector["matchLabels"] = labels
    if expressions:
        selector["matchExpressions"] = expressions
    return selector
