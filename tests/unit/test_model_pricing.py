"""Model prices from the installation's price table (operator settings, Helm value
`modelPrices`) with the Agent's `model.pricing` overriding it, rendered into the runtime
config for the Agent's own models only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fleetward.operator.desired.agent import AgentInputs, AgentRef, runtime_config
from fleetward.operator.settings import OperatorSettings, SettingsError, load

from fleetward.api.agent import AgentSpec, ModelPricing
from tests.support.chart import rendered_settings


def price(i: float, o: float) -> dict:
    return {"inputPerMillionTokens": i, "outputPerMillionTokens": o}


def render(spec: dict, table: dict) -> dict:
    settings = OperatorSettings.model_validate({"namespace": "fleetward-system", "modelPrices": table})
    inputs = AgentInputs(ref=AgentRef("ns", "a", "uid"), spec=AgentSpec.model_validate(spec), settings=settings)
    return runtime_config(inputs).to_wire()["modelPrices"]


def model(name: str, **extra) -> dict:
    return {"name": name, "baseURL": "http://127.0.0.1:1/v1", **extra}


def test_the_installation_table_prices_the_agents_models_and_only_those():
    table = {"big": price(5, 15), "small": price(0.15, 0.6), "other": price(1, 2)}
    spec = {"role": "specialist", "model": {**model("big"), "fallbacks": [model("small"), model("unpriced")]}}
    assert render(spec, table) == {"big": price(5.0, 15.0), "small": price(0.15, 0.6)}


def test_the_agents_own_pricing_overrides_the_table_per_model():
    table = {"big": price(5, 15), "small": price(0.15, 0.6)}
    spec = {
        "role": "specialist",
        "model": {**model("big", pricing=price(4, 12)), "fallbacks": [model("small"), model("x", pricing=price(0, 0))]},
    }
    assert render(spec, table) == {"big": price(4.0, 12.0), "small": price(0.15, 0.6), "x": price(0.0, 0.0)}


def test_a_price_change_rolls_only_the_agents_that_use_the_model():
    spec = {"role": "specialist", "model": model("big")}

    def config_hash(table: dict) -> str:
        settings = OperatorSettings.model_validate({"namespace": "fleetward-system", "modelPrices": table})
        return runtime_config(
            AgentInputs(AgentRef("ns", "a", "uid"), AgentSpec.model_validate(spec), settings)
        ).config_hash

    base = config_hash({"big": price(5, 15)})
    assert config_hash({"big": price(5, 15), "other": price(1, 1)}) == base
    assert config_hash({"big": price(6, 15)}) != base


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"gpt-4o": price(-1, 1)},
            "modelPrices.gpt-4o.inputPerMillionTokens: Input should be greater than or equal to 0",
        ),
        ({"gpt-4o": {"inputPerMillionTokens": 1}}, "modelPrices.gpt-4o.outputPerMillionTokens: Field required"),
        ({"gpt-4o": price(1, "cheap")}, "modelPrices.gpt-4o.outputPerMillionTokens: Input should be a valid number"),
    ],
)
def test_a_bad_installation_price_stops_the_operator_naming_the_field(tmp_path: Path, table: dict, message: str):
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"modelPrices": table}))
    with pytest.raises(SettingsError) as err:
        load(path)
    assert message in str(err.value)


def test_the_helm_value_reaches_the_operator_settings(tmp_path: Path):
    settings = rendered_settings(
        tmp_path,
        "modelPrices.gpt-4o-mini.inputPerMillionTokens=0.15",
        "modelPrices.gpt-4o-mini.outputPerMillionTokens=0.6",
    )
    assert settings.model_prices == {
        "gpt-4o-mini": ModelPricing(input_per_million_tokens=0.15, output_per_million_tokens=0.6)
    }
    # The default values render an empty table, which is valid.
    assert rendered_settings(tmp_path).model_prices == {}
