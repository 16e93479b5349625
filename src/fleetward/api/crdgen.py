"""Generate CustomResourceDefinitions from the typed models.

The CRDs in `crds/` are output of this module and never edited by hand; a test
fails when they are stale (`fleetward crds generate --check`).

Pydantic emits JSON Schema (draft 2020-12); the API server wants a *structural*
OpenAPI v3 schema: every node typed, no `$ref`, no `null` branches, boolean
`exclusiveMinimum`. No library converts one into the other with Kubernetes'
extensions (`x-kubernetes-*`) intact, so the conversion is written here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from fleetward.api.agent import Agent
from fleetward.api.base import GROUP, VERSION, Resource
from fleetward.api.guardrail import Guardrail
from fleetward.api.killswitch import KillSwitch
from fleetward.api.sop import SOP

KINDS: tuple[type[Resource], ...] = (Agent, SOP, Guardrail, KillSwitch)
# CRDs of other projects that the Helm chart installs beside ours (Kopf's peering).
THIRD_PARTY = {"kopf.dev_peerings.yaml"}

# JSON Schema keywords the structural schema keeps as they are.
_KEEP = {
    "type",
    "format",
    "description",
    "default",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "nullable",
}


class SchemaError(ValueError):
    pass


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict) and "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = {**copy.deepcopy(defs[name]), **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return node


def to_structural(node: dict[str, Any], defs: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Convert one pydantic JSON Schema node (and its children) to structural OpenAPI."""
    node = _resolve(node, defs)

    # Optional[X] -> X (an absent field is the "null" of a Kubernetes object).
    for key in ("anyOf", "oneOf"):
        if key in node and not node.get("x-kubernetes-int-or-string"):
            branches = [b for b in node[key] if _resolve(b, defs).get("type") != "null"]
            if len(branches) != 1:
                raise SchemaError(f"{path or '<root>'}: unions other than Optional[X] are not structural")
            rest = {k: v for k, v in node.items() if k != key}
            return to_structural({**_resolve(branches[0], defs), **rest}, defs, path)

    out: dict[str, Any] = {}
    for k, v in node.items():
        if k in _KEEP or (k.startswith("x-kubernetes-") and k != "x-kubernetes-validations"):
            out[k] = copy.deepcopy(v)
        elif k == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = v, True
        elif k == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = v, True
        elif k == "const":
            out["enum"] = [v]
        elif k == "anyOf":  # int-or-string
            out["anyOf"] = v
    if "x-kubernetes-validations" in node:
        out["x-kubernetes-validations"] = copy.deepcopy(node["x-kubernetes-validations"])
    if "description" in out:
        out["description"] = " ".join(out["description"].split())
    if out.get("default", 0) is None:  # "no value" is expressed by leaving the field out
        del out["default"]

    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        return out
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out["type"] = "object"
        if "properties" in node:  # known fields of an otherwise free-form object
            out["properties"] = {n: to_structural(s, defs, f"{path}.{n}") for n, s in node["properties"].items()}
        return _ordered(out)

    typ = out.get("type")
    if typ == "object":
        if "properties" in node:
            out["properties"] = {
                name: to_structural(sub, defs, f"{path}.{name}") for name, sub in node["properties"].items()
            }
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = to_structural(node["additionalProperties"], defs, f"{path}[*]")
        elif len(node.get("patternProperties") or {}) == 1:
            # A dict with constrained keys: OpenAPI has no patternProperties, so the values'
            # schema becomes additionalProperties and the field must check its keys in CEL.
            if not any("self.all(" in r["rule"] for r in node.get("x-kubernetes-validations", [])):
                raise SchemaError(f"{path}: keys with a pattern need a CEL rule over self.all(...)")
            (values,) = node["patternProperties"].values()
            out["additionalProperties"] = to_structural(values, defs, f"{path}[*]")
        elif node.get("additionalProperties") is not False:
            raise SchemaError(f"{path}: free-form object needs x-kubernetes-preserve-unknown-fields")
    elif typ == "array":
        out["items"] = to_structural(node["items"], defs, f"{path}[]")
    elif typ is None:
        raise SchemaError(f"{path or '<root>'}: schema node has no type")
    return _ordered(out)


# Order keys the way a person reads a schema: what it is, then constraints, then children.
_ORDER = [
    "type",
    "description",
    "format",
    "enum",
    "default",
    "pattern",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "required",
]


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    head = [k for k in _ORDER if k in node]
    return {k: node[k] for k in head + sorted(k for k in node if k not in _ORDER)}


def openapi_schema(model: type[Resource]) -> dict[str, Any]:
    """The structural schema of one kind (apiVersion, kind, metadata, spec, status)."""
    spec_model = model.model_fields["spec"].annotation
    status_model = model.model_fields["status"].annotation
    status_model = next(a for a in status_model.__args__ if a is not type(None))  # Optional[Status]

    def schema_of(m: Any) -> dict[str, Any]:
        js = m.model_json_schema(by_alias=True, mode="validation")
        return to_structural(js, js.get("$defs", {}), path=m.__name__)

    spec = schema_of(spec_model)
    status = schema_of(status_model)
    kind = model.KIND
    root: dict[str, Any] = {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "fleetward.dev/v1alpha1"},
            "kind": {"type": "string", "description": kind.kind},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if kind.object_rules:
        root["x-kubernetes-validations"] = [dict(r) for r in kind.object_rules]
    return root


def crd(model: type[Resource]) -> dict[str, Any]:
    kind = model.KIND
    columns = []
    for c in kind.columns:
        col: dict[str, Any] = {"name": c.name, "type": c.type, "jsonPath": c.json_path}
        if c.description:
            col["description"] = c.description
        if c.priority:
            col["priority"] = c.priority
        columns.append(col)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.crd_name,
            "labels": {"app.kubernetes.io/name": "fleetward", "app.kubernetes.io/part-of": "fleetward"},
        },
        "spec": {
            "group": GROUP,
            "scope": kind.scope,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": list(kind.categories),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": openapi_schema(model)},
                }
            ],
        },
    }


HEADER = "# Generated by `fleetward crds generate` from fleetward.api; do not edit.\n"


def render(model: type[Resource]) -> str:
    return HEADER + yaml.safe_dump(crd(model), sort_keys=False, width=100, allow_unicode=True)


def file_name(model: type[Resource]) -> str:
    return f"{GROUP}_{model.KIND.plural}.yaml"


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for model in KINDS:
        path = out_dir / file_name(model)
        path.write_text(render(model))
        written.append(path)
    return written


def stale(out_dir: Path) -> list[str]:
    """Names of CRD files in out_dir that differ from what the models generate."""
    problems = []
    expected = {file_name(m): render(m) for m in KINDS}
    for name, text in expected.items():
        path = out_dir / name
        if not path.exists():
            problems.append(f"{name}: missing")
        elif path.read_text() != text:
            problems.append(f"{name}: differs from the models")
    for path in sorted(out_dir.glob("*.yaml")):
        if path.name not in expected and path.name not in THIRD_PARTY:
            problems.append(f"{path.name}: not generated by any model (remove it)")
    return problems
