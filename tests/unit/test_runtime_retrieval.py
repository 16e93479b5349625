"""SOP retrieval with the packaged all-MiniLM-L6-v2 (int8 ONNX), offline, and its keyword fallback."""

from __future__ import annotations

import pytest
from fleetward.runtime.retrieval import Embedder, SopRetriever, keyword_scores, model_files

from fleetward.api.runtimeconfig import ResolvedSOP
from fleetward.api.sop import SOPSpec


def sop(name: str, title: str, instructions: str, keywords: list[str]) -> ResolvedSOP:
    return ResolvedSOP(
        name=name,
        version="1.0.0",
        spec=SOPSpec.model_validate(
            {
                "domain": "d",
                "title": title,
                "version": "1.0.0",
                "instructions": instructions,
                "triggers": {"keywords": keywords},
            }
        ),
    )


SOPS = [
    sop("refunds", "Refund a duplicate charge", "Verify the transaction id before issuing any refund.", ["refund"]),
    sop(
        "2fa",
        "Two-factor authentication lockout",
        "Verify identity, then offer recovery codes.",
        ["2FA", "recovery code"],
    ),
    sop("tokens", "Revoke a leaked personal access token", "Revoke leaked tokens after an identity check.", ["PAT"]),
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def test_the_model_files_ship_in_packages_and_match_their_checksums():
    model, tokenizer = model_files()
    assert model.name == "model.onnx" and tokenizer.name == "tokenizer.json"


def test_embeddings_are_normalised_384_dimensional_vectors(embedder: Embedder):
    vectors = embedder.embed(["hello world", "a second, longer sentence about refunds"])
    assert vectors.shape == (2, 384)
    assert abs(float((vectors[0] ** 2).sum()) - 1.0) < 1e-4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I was charged twice last month, I want my money back", "refunds"),
        ("my authenticator app broke and I cannot log in", "2fa"),
        ("I accidentally pushed my access token to a public repository", "tokens"),
    ],
)
def test_semantic_search_finds_the_sop_without_shared_keywords(embedder: Embedder, text: str, expected: str):
    found = SopRetriever(SOPS, threshold=0.3, embedder=embedder).retrieve(text)
    assert found.method == "semantic" and found.sop is not None and found.sop.name == expected, found


def test_an_unrelated_request_matches_no_sop(embedder: Embedder):
    found = SopRetriever(SOPS, threshold=0.3, embedder=embedder).retrieve(
        "What will the weather be in Lisbon tomorrow?"
    )
    assert found.sop is None and found.method == "none" and "threshold" in found.detail


def test_below_the_threshold_trigger_keywords_still_select_an_sop(embedder: Embedder):
    found = SopRetriever(SOPS, threshold=1.01, embedder=embedder).retrieve("Where is my 2FA recovery code?")
    assert found.method == "keyword" and found.sop is not None and found.sop.name == "2fa"


def test_keywords_match_whole_words_case_insensitively():
    assert keyword_scores("please REFUND me", SOPS) == [1, 0, 0]
    assert keyword_scores("refunds and PATs", SOPS) == [0, 0, 0]  # inflections are not listed
    assert keyword_scores("lost my recovery   code", SOPS) == [0, 1, 0]
