"""Process settings of the runtime (the database DSN) and what moved into the rendered
config: the model price table and the SOP similarity threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleetward.runtime.config import ConfigError, load_config, model_prices, process_settings
from pydantic import ValidationError

from fleetward.api.agent import AgentSpec
from fleetward.api.runtimeconfig import RuntimeConfig

DOC = {
    "installation": {"namespace": "fleetward-system", "trustBundle": {"namespace": "fleetward-system"}},
    "agent": {"namespace": "ns", "name": "billing"},
    "spec": {"role": "specialist", "model": {"name": "m", "baseURL": "http://127.0.0.1:1/v1"}},
    "topics": {"request": "fleetward.requests.ns.billing"},
    "kafka": {"bootstrapServers": "127.0.0.1:9092", "consumerGroup": "g"},
    "credentials": {"signingKeyFile": "/k", "keyId": "kid"},
    "persistence": {"dsnEnv": "FLEETWARD_DATABASE_DSN"},
}
CONFIG = RuntimeConfig.model_validate(DOC)


def test_prices_come_from_the_config_in_usd_per_million_tokens():
    config = RuntimeConfig.model_validate(
        {**DOC, "modelPrices": {"gpt-4o-mini": {"inputPerMillionTokens": 0.15, "outputPerMillionTokens": 0.6}}}
    )
    prices = model_prices(config)
    assert prices["gpt-4o-mini"].cost(1_000_000, 500_000) == pytest.approx(0.45)
    assert prices["gpt-4o-mini"].cost(1234, 56) == pytest.approx((1234 * 0.15 + 56 * 0.6) / 1e6)
    assert model_prices(CONFIG) == {}


def test_the_old_environment_variables_are_not_read():
    settings = process_settings(
        CONFIG,
        {
            "FLEETWARD_DATABASE_DSN": "postgresql://x",
            "FLEETWARD_MODEL_PRICES": '{"m": {"input": 1, "output": 1}}',
            "FLEETWARD_SOP_SIMILARITY_THRESHOLD": "2",
        },
    )
    assert not hasattr(settings, "prices") and not hasattr(settings, "sop_similarity_threshold")


@pytest.mark.parametrize(
    ("prices", "message"),
    [
        ({"m": {"inputPerMillionTokens": -1, "outputPerMillionTokens": 1}}, "modelPrices.m.inputPerMillionTokens"),
        ({"m": {"inputPerMillionTokens": 1}}, "modelPrices.m.outputPerMillionTokens: Field required"),
        ({"m": {"input": 1, "output": 1}}, "modelPrices.m.input: Extra inputs are not permitted"),
    ],
)
def test_a_bad_price_in_the_config_is_named(tmp_path: Path, prices: dict, message: str):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**DOC, "modelPrices": prices}))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_similarity_threshold_is_on_the_agent_spec_with_a_default_and_bounds():
    spec = {"role": "specialist", "model": {"name": "m", "baseURL": "http://127.0.0.1:1/v1"}}
    assert AgentSpec.model_validate(spec).sop_retrieval.similarity_threshold == 0.30
    assert (
        AgentSpec.model_validate(
            {**spec, "sopRetrieval": {"similarityThreshold": 0.5}}
        ).sop_retrieval.similarity_threshold
        == 0.5
    )
    for bad in (-0.1, 1.5):
        with pytest.raises(ValidationError) as err:
            AgentSpec.model_validate({**spec, "sopRetrieval": {"similarityThreshold": bad}})
        assert "sopRetrieval.similarityThreshold" in str(err.value)


def test_a_dsn_env_that_is_empty_is_an_error_naming_the_variable():
    with pytest.raises(ConfigError, match="FLEETWARD_DATABASE_DSN"):
        process_settings(CONFIG, {})
    settings = process_settings(CONFIG, {"FLEETWARD_DATABASE_DSN": "postgresql://x", "POD_NAME": "p-0"})
    assert settings.database_dsn == "postgresql://x" and settings.instance == "p-0"


def test_the_shutdown_bound_is_checked():
    env = {"FLEETWARD_DATABASE_DSN": "postgresql://x", "FLEETWARD_SHUTDOWN_SECONDS": "-1"}
    with pytest.raises(ConfigError, match="FLEETWARD_SHUTDOWN_SECONDS='-1'"):
        process_settings(CONFIG, env)
