"""The API server checks an Agent's model prices and SOP similarity threshold (generated
CRD schema) and names the field; the threshold defaults to 0.30."""

from __future__ import annotations

import copy
import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, NS = "fleetward.dev", "v1alpha1", "default"
AGENT = {
    "apiVersion": "fleetward.dev/v1alpha1",
    "kind": "Agent",
    "metadata": {"name": "priced-agent"},
    "spec": {
        "role": "specialist",
        "model": {
            "name": "m",
            "baseURL": "http://127.0.0.1:18000/v1",
            "pricing": {"inputPerMillionTokens": 0.15, "outputPerMillionTokens": 0.6},
            "fallbacks": [
                {
                    "name": "f",
                    "baseURL": "http://127.0.0.1:18000/v1",
                    "pricing": {"inputPerMillionTokens": 0, "outputPerMillionTokens": 0},
                }
            ],
        },
    },
}


@pytest.fixture(scope="module")
def objs(crds, api) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def create(objs: client.CustomObjectsApi, manifest: dict) -> dict:
    return objs.create_namespaced_custom_object(GROUP, VERSION, NS, "agents", manifest, dry_run="All")


def test_prices_are_accepted_and_the_threshold_defaults(objs):
    created = create(objs, copy.deepcopy(AGENT))
    assert created["spec"]["model"]["pricing"] == {"inputPerMillionTokens": 0.15, "outputPerMillionTokens": 0.6}
    assert created["spec"]["sopRetrieval"] == {"similarityThreshold": 0.3}


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (
            lambda s: s["model"]["pricing"].update(inputPerMillionTokens=-0.1),
            ["spec.model.pricing.inputPerMillionTokens", "should be greater than or equal to 0"],
        ),
        (
            lambda s: s["model"]["fallbacks"][0]["pricing"].pop("outputPerMillionTokens"),
            ["spec.model.fallbacks[0].pricing.outputPerMillionTokens", "Required value"],
        ),
        (
            lambda s: s.update(sopRetrieval={"similarityThreshold": 1.2}),
            ["spec.sopRetrieval.similarityThreshold", "should be less than or equal to 1"],
        ),
        (
            lambda s: s.update(sopRetrieval={"similarityThreshold": -0.5}),
            ["spec.sopRetrieval.similarityThreshold", "should be greater than or equal to 0"],
        ),
    ],
    ids=["negative-price", "half-a-price", "threshold-above-1", "threshold-below-0"],
)
def test_a_bad_price_or_threshold_is_rejected_naming_the_field(objs, change, fragments):
    manifest = copy.deepcopy(AGENT)
    change(manifest["spec"])
    with pytest.raises(ApiException) as err:
        create(objs, manifest)
    assert err.value.status == 422, err.value.body
    message = json.loads(err.value.body)["message"]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
