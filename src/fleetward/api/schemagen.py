"""Generate `schemas/envelopes.schema.json` (JSON Schema draft 2020-12) from the envelope models,
and `schemas/runtime-config.schema.json` from the runtime config contract (fleetward.api.runtimeconfig).

Pydantic writes each model's schema; two things it cannot say are added here, from the
same declarations the models validate with:
- `data` depends on `type`: one `if type == X then data is <payload of X>` per type;
- the models' cross-field `Rule`s, as `if/then` too.
The file stays plain (`$ref`, `enum`, `const`, `pattern`, `if/then`, `anyOf`/`oneOf`) so any
validator, in any language, can use it; it is written with sorted keys so a stale copy is
detected by comparing text (`fleetward schemas generate --check`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema

from fleetward.api.envelopes import ENVELOPES, PayloadEnvelope, Rule, WireModel
from fleetward.api.envelopes.wire import wire_name

SCHEMA_ID = "https://fleetward.dev/schemas/envelopes.schema.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _ref(name: str, defs: dict[str, Any]) -> dict[str, str]:
    if name not in defs:  # pydantic renames models only on name clashes; we must not have any
        raise RuntimeError(f"model {name} is not in the generated $defs")
    return {"$ref": f"#/$defs/{name}"}


def _rule_schema(model: type[WireModel], rule: Rule) -> dict[str, Any]:
    when = wire_name(model, rule.when)
    then: dict[str, Any] = {}
    props: dict[str, Any] = {}
    # The models treat an explicit null as absent, so "required" means present and not
    # null, and "forbidden" means absent or null.
    for attr in rule.require:
        props[wire_name(model, attr)] = {"not": {"type": "null"}}
    if rule.require:
        then["required"] = [wire_name(model, a) for a in rule.require]
    for attr in rule.forbid:
        props[wire_name(model, attr)] = {"type": "null"}
    for path, allowed in rule.restrict.items():
        first, *rest = path.split(".")
        node: dict[str, Any] = {"enum": list(allowed)}
        for part in reversed(rest):
            node = {"properties": {part: node}}
        props[wire_name(model, first)] = node
    if props:
        then["properties"] = props
    return {"if": {"properties": {when: {"enum": list(rule.values)}}, "required": [when]}, "then": then}


def _clean(node: Any) -> Any:
    """Drop pydantic's generated titles and the CRD-only `x-kubernetes-*` keys of API models
    reused on the wire (their CEL rules are the API server's), fold docstring line breaks,
    close pattern-keyed maps."""
    if isinstance(node, list):
        return [_clean(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    if "patternProperties" in node and "additionalProperties" not in node:
        # pydantic's form of dict[<str with a pattern>, X]; without this, keys that miss the
        # pattern would pass the schema although the model rejects them.
        out["additionalProperties"] = False
    for key, value in node.items():
        if key == "title" or key.startswith("x-kubernetes-"):
            continue
        if key in ("properties", "patternProperties"):  # maps of names to schemas: keep every name
            out[key] = {name: _clean(sub) for name, sub in value.items()}
        elif key == "description" and isinstance(value, str):
            out[key] = " ".join(value.split())
        else:
            out[key] = _clean(value)
    return out


def _models(root: type[WireModel]) -> list[type[WireModel]]:
    seen: list[type[WireModel]] = []
    stack = list(root.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen


def build() -> dict[str, Any]:
    """The whole schema document."""
    envelopes = list(ENVELOPES.values())
    _, top = models_json_schema([(m, "validation") for m in envelopes], by_alias=True)
    defs: dict[str, Any] = top["$defs"]

    for envelope in envelopes:
        target = defs[envelope.__name__]
        if issubclass(envelope, PayloadEnvelope):
            target["properties"]["data"] = {
                "type": "object",
                "description": "The type-specific payload; its shape is chosen by `type`.",
            }
            target.setdefault("allOf", []).extend(
                {
                    "if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
                    "then": {"properties": {"data": _ref(payload.__name__, defs)}},
                }
                for kind, payload in envelope.PAYLOADS.items()
            )
    for model in sorted(_models(WireModel), key=lambda m: m.__name__):
        if model.RULES and model.__name__ in defs:
            defs[model.__name__].setdefault("allOf", []).extend(_rule_schema(model, r) for r in model.RULES)

    return _clean(
        {
            "$schema": DRAFT,
            "$id": SCHEMA_ID,
            "title": "Fleetward envelopes",
            "description": "Session events, agent commands, control messages and control acks (SPEC section 6). "
            "Generated from fleetward.api.envelopes by `fleetward schemas generate`; do not edit.",
            "oneOf": [_ref(m.__name__, defs) for m in envelopes],
            "$defs": defs,
        }
    )


def render() -> str:
    """The schema as committed: sorted keys, two-space indent, trailing newline."""
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    return path


def is_stale(path: Path) -> bool:
    """True when the file is missing or differs from what the models generate."""
    return not path.is_file() or path.read_text(encoding="utf-8") != render()


RUNTIME_CONFIG_ID = "https://fleetward.dev/schemas/runtime-config.schema.json"


def build_runtime_config() -> dict[str, Any]:
    """The schema of the config the operator renders and `fleetward runtime run` loads."""
    from fleetward.api.runtimeconfig import RuntimeConfig

    schema = RuntimeConfig.model_json_schema(by_alias=True)
    schema.update(
        {
            "$schema": DRAFT,
            "$id": RUNTIME_CONFIG_ID,
            "description": "Rendered runtime config of one Agent (config.json in its ConfigMap). Generated "
            "from fleetward.api.runtimeconfig by `fleetward schemas generate`; do not edit.",
        }
    )
    return schema


def render_runtime_config() -> str:
    return json.dumps(build_runtime_config(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# Every generated schema file: name in schemas/ -> renderer.
FILES = {"envelopes.schema.json": render, "runtime-config.schema.json": render_runtime_config}


def stale_files(folder: Path) -> list[str]:
    """Names of the generated files in `folder` that are missing or out of date."""
    return [n for n, fn in FILES.items() if not (folder / n).is_file() or (folder / n).read_text("utf-8") != fn()]


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, fn in FILES.items():
        (folder / name).write_text(fn(), encoding="utf-8")
        out.append(folder / name)
    return out
