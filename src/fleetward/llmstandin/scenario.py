"""The scenario model of the LLM stand-in: an ordered list of rules, each a match and an answer.

The format is documented for scenario authors in docs/llm-standin.md; keep the two in step.
Every model forbids unknown keys so a typo in a scenario is an error, not a rule that never fires.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

SCENARIO_SUFFIXES = (".yaml", ".yml", ".json")


class ScenarioError(ValueError):
    """A scenario that cannot be loaded; the message names the source, the rule index and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True, strict=True)


class TextMatch(_Model):
    """A test on a piece of text; every condition given must hold."""

    equals: str | None = None
    contains: str | None = None
    regex: str | None = None
    ignore_case: bool = False

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"not a valid Python regular expression ({e}): {value!r}") from None
        return value

    @model_validator(mode="after")
    def _has_a_condition(self) -> TextMatch:
        if self.equals is None and self.contains is None and self.regex is None:
            raise ValueError("give at least one of equals, contains, regex")
        return self

    def test(self, text: str | None) -> bool:
        if text is None:
            return False
        fold: Callable[[str], str] = str.casefold if self.ignore_case else str
        if self.equals is not None and fold(text) != fold(self.equals):
            return False
        if self.contains is not None and fold(self.contains) not in fold(text):
            return False
        flags = re.IGNORECASE if self.ignore_case else 0
        return self.regex is None or re.search(self.regex, text, flags) is not None


def _text_shorthand(kind: str) -> Callable[[Any], Any]:
    """A plain string stands for {kind: string}: `equals` for names, `contains` for message texts."""
    return lambda value: {kind: value} if isinstance(value, str) else value


EqualsText = Annotated[TextMatch, BeforeValidator(_text_shorthand("equals"))]
ContainsText = Annotated[TextMatch, BeforeValidator(_text_shorthand("contains"))]


class CountRange(_Model):
    min: int | None = Field(default=None, ge=0)
    max: int | None = Field(default=None, ge=0)

    def test(self, count: int) -> bool:
        return (self.min is None or count >= self.min) and (self.max is None or count <= self.max)


CountMatch = Annotated[CountRange, BeforeValidator(lambda v: {"min": v, "max": v} if isinstance(v, int) else v)]


class Match(_Model):
    """Conditions on a request; all given must hold. An empty match matches every request."""

    model: EqualsText | None = None
    system: ContainsText | None = None
    last_user: ContainsText | None = None
    last_tool: ContainsText | None = None
    last_role: Literal["system", "developer", "user", "assistant", "tool"] | None = None
    tools_offered: bool | list[str] | None = None
    tool_result_for: str | None = None
    schema_name: str | None = None
    prior_turns: CountMatch | None = None
    stream: bool | None = None
    api_key: str | None = None
    headers: dict[str, EqualsText] = Field(default_factory=dict)


class ToolCall(_Model):
    name: str = Field(min_length=1)
    # An object is sent as JSON text; a string is sent verbatim (so a scenario can send broken arguments).
    arguments: dict[str, Any] | str = Field(default_factory=dict)
    id: str | None = Field(default=None, min_length=1)


class UsageOverride(_Model):
    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)


class Respond(_Model):
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    json_value: Any = Field(default=None, alias="json")
    usage: UsageOverride | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None = None
    model: str | None = None
    allow_mismatch: bool = False

    @property
    def has_json(self) -> bool:
        return "json_value" in self.model_fields_set

    @model_validator(mode="after")
    def _says_something(self) -> Respond:
        if self.content is None and not self.tool_calls and not self.has_json:
            raise ValueError("give content, toolCalls or json")
        if self.content is not None and self.has_json:
            raise ValueError("give content (verbatim text) or json (checked against the schema), not both")
        return self


class ErrorReply(_Model):
    status: int = Field(ge=400, le=599)
    message: str | None = None
    body: dict[str, Any] | str | None = None
    retry_after: float | None = Field(default=None, ge=0)


class Rule(_Model):
    name: str | None = None
    match: Match = Field(default_factory=Match)
    respond: Respond | None = None
    error: ErrorReply | None = None
    timeout: float | None = Field(default=None, gt=0)
    delay_seconds: float = Field(default=0, ge=0)
    hold_seconds: float = Field(default=0, ge=0)
    wait_for_gate: str | None = Field(default=None, min_length=1)
    times: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_outcome(self) -> Rule:
        given = [k for k, v in (("respond", self.respond), ("error", self.error), ("timeout", self.timeout)) if v]
        if len(given) != 1:
            raise ValueError(f"a rule needs exactly one of respond, error, timeout (got {given or 'none'})")
        if self.timeout and self.hold_seconds:
            raise ValueError("holdSeconds cannot be combined with timeout (a timeout never answers)")
        return self

    def label(self, index: int) -> str:
        return f"rules[{index}]" + (f" ({self.name!r})" if self.name else "")


class Scenario(_Model):
    name: str | None = None
    models: list[str] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)

    def model_names(self) -> list[str]:
        """Models listed by GET /v1/models: the declared ones, then those rules match exactly."""
        names = list(self.models)
        for rule in self.rules:
            if rule.match.model is not None and rule.match.model.equals and rule.match.model.equals not in names:
                names.append(rule.match.model.equals)
        return names


def parse_scenario(data: Any, source: str) -> Scenario:
    """Validate one scenario document (a mapping with `rules`, or a bare list of rules)."""
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, dict):
        raise ScenarioError(
            f"{source}: a scenario is a mapping with a 'rules' list (or a bare list of rules), "
            f"got {type(data).__name__}"
        )
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(_describe_errors(e.errors(), data, source)) from None


def load_scenarios(paths: Iterable[str | Path]) -> Scenario:
    """Load scenario files (YAML or JSON) and folders (their *.yaml/*.yml/*.json files, by name) into one
    scenario whose rules keep file order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in SCENARIO_SUFFIXES and p.is_file())
            if not found:
                raise ScenarioError(f"{path}: folder holds no scenario file ({', '.join(SCENARIO_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ScenarioError(f"{path}: no such scenario file or folder")
    parts = [_load_file(f) for f in files]
    return merge_scenarios(parts, name=", ".join(p.name or f.name for p, f in zip(parts, files, strict=True)))


def merge_scenarios(parts: list[Scenario], name: str | None = None) -> Scenario:
    models: list[str] = []
    for part in parts:
        models.extend(m for m in part.models if m not in models)
    return Scenario(name=name, models=models, rules=[rule for part in parts for rule in part.rules])


def _load_file(path: Path) -> Scenario:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ScenarioError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        raise ScenarioError(f"{path}: file is empty")
    return parse_scenario(data, str(path))


def _describe_errors(errors: list[Any], data: dict[str, Any], source: str) -> str:
    """One line per faulty field: source, rule index (and name), field path in scenario spelling, what is
    wrong, and for unknown keys the keys allowed there. The per-member errors of a union are merged."""
    lines: dict[str, list[str]] = {}
    for err in errors:
        where, message = _describe(err, data, source)
        lines.setdefault(where, [])
        if message not in lines[where]:
            lines[where].append(message)
    return "\n".join(f"{where}: {' or '.join(messages)}" for where, messages in lines.items())


_SHORTHAND_FORMS = {
    "TextMatch": "a string or a mapping of equals, contains, regex, ignoreCase",
    "CountRange": "a whole number or a mapping of min, max",
}


def _describe(err: Any, data: dict[str, Any], source: str) -> tuple[str, str]:
    loc = list(err["loc"])
    where = source
    model: type[BaseModel] = Scenario
    rules = data.get("rules")
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int) and isinstance(rules, list):
        index = loc[1]
        name = rules[index].get("name") if isinstance(rules[index], dict) else None
        where += f": rules[{index}]" + (f" ({name!r})" if isinstance(name, str) else "")
        loc = loc[2:]
        model = Rule
    path, allowed = _field_path(loc, model)
    message = err["msg"].removeprefix("Value error, ")
    expected = _SHORTHAND_FORMS.get((err.get("ctx") or {}).get("class_name", ""))
    if err["type"] == "model_type" and expected:
        message = f"expected {expected}"
    if err["type"] == "extra_forbidden":
        message += f"; allowed here: {', '.join(allowed)}"
    elif err["type"] not in ("missing", "value_error") and not isinstance(err.get("input"), dict | list):
        message += f" (got {err.get('input')!r})"
    return f"{where}: field {path or '(the rule itself)'}", message


def _field_path(loc: list[Any], model: type[BaseModel]) -> tuple[str, list[str]]:
    """Render a pydantic location as `respond.toolCalls[0].arguments`, without pydantic's union-member
    tags (they are not keys of the document); also return the keys allowed by the innermost model."""
    path = ""
    allowed: list[str] = []
    current: Any = model
    skip_union_tag = False
    for part in loc:
        if skip_union_tag and isinstance(part, str):
            skip_union_tag = False
            continue
        skip_union_tag = False
        if isinstance(part, int):
            path += f"[{part}]"
            current = _list_item(current)
        elif isinstance(current, type) and issubclass(current, BaseModel):
            fields = {(f.alias or n): f for n, f in current.model_fields.items()}
            allowed = list(fields)
            path += ("." if path else "") + part
            annotation = fields[part].annotation if part in fields else None
            skip_union_tag = _union_size(annotation) > 1
            current = _unwrap(annotation)
        elif typing.get_origin(current) is dict:
            path += f"[{part!r}]"
            current = _unwrap(typing.get_args(current)[1])
    return path, allowed


def _union_size(annotation: Any) -> int:
    """How many non-None members a union annotation has (1 for a plain type)."""
    annotation = _strip_annotated(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return sum(1 for arg in typing.get_args(annotation) if arg is not type(None))
    return 1


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X; a model, `list[...]` or `dict[...]` is kept; other unions and scalars -> None."""
    annotation = _strip_annotated(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(members[0]) if len(members) == 1 else None
    return annotation


def _list_item(annotation: Any) -> Any:
    return _unwrap(typing.get_args(annotation)[0]) if typing.get_origin(annotation) is list else None
