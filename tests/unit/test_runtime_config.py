"""Process settings of the runtime: price table, thresholds, the database DSN."""

from __future__ import annotations

import pytest
from fleetward.runtime.config import ConfigError, parse_prices, process_settings

from fleetward.api.runtimeconfig import RuntimeConfig

CONFIG = RuntimeConfig.model_validate(
    {
        "installation": {"namespace": "fleetward-system", "trustBundle": {"namespace": "fleetward-system"}},
        "agent": {"namespace": "ns", "name": "billing"},
        "spec": {"role": "specialist", "model": {"name": "m", "baseURL": "http://127.0.0.1:1/v1"}},
        "topics": {"request": "fleetward.requests.ns.billing"},
        "kafka": {"bootstrapServers": "127.0.0.1:9092", "consumerGroup": "g"},
        "credentials": {"signingKeyFile": "/k", "keyId": "kid"},
        "persistence": {"dsnEnv": "FLEETWARD_DATABASE_DSN"},
    }
)


def test_prices_are_usd_per_million_tokens():
    prices = parse_prices('{"gpt-4o-mini": {"input": 0.15, "output": 0.6}}')
    assert prices["gpt-4o-mini"].cost(1_000_000, 500_000) == pytest.approx(0.45)
    assert parse_prices(None) == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("nope", "not JSON"),
        ("[1]", "expected an object"),
        ('{"m": {"input": 1}}', "FLEETWARD_MODEL_PRICES.m"),
        ('{"m": {"input": -1, "output": 1}}', "FLEETWARD_MODEL_PRICES.m.input: expected a number >= 0"),
    ],
)
def test_a_bad_price_table_is_named(raw: str, message: str):
    with pytest.raises(ConfigError, match=message):
        parse_prices(raw)


def test_a_dsn_env_that_is_empty_is_an_error_naming_the_variable():
    with pytest.raises(ConfigError, match="FLEETWARD_DATABASE_DSN"):
        process_settings(CONFIG, {})
    settings = process_settings(CONFIG, {"FLEETWARD_DATABASE_DSN": "postgresql://x", "POD_NAME": "p-0"})
    assert settings.database_dsn == "postgresql://x" and settings.instance == "p-0"


def test_the_similarity_threshold_is_bounded():
    env = {"FLEETWARD_DATABASE_DSN": "postgresql://x", "FLEETWARD_SOP_SIMILARITY_THRESHOLD": "2"}
    with pytest.raises(ConfigError, match="FLEETWARD_SOP_SIMILARITY_THRESHOLD='2'"):
        process_settings(CONFIG, env)
