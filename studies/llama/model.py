"""A Llama decoder (transformers' LlamaForCausalLM, built from a LlamaConfig: no download) timed at prefill.

Size from the environment, so one file serves the CPU tests and the GPU study:

    AUTOPREC_LLAMA_SIZE=tiny   (default) hidden 64, 2 layers, vocabulary 512; prefill 2 x 32 tokens
    AUTOPREC_LLAMA_SIZE=1b     hidden 2048, 16 layers, FFN 8192, 32 heads, vocabulary 32000 (1.20B
                               parameters, 4.8 GB in fp32); prefill 4 x 512 tokens

Weights are drawn with a fixed seed (transformers' own initialisation), then rescaled so that the model
behaves like a trained one under small perturbations (README.md says why and what it changes): the token
embeddings get standard deviation 1 (the residual stream starts at unit scale), each block's output
projections (`o_proj`, `down_proj`) are scaled by 1/sqrt(2 x layers) (GPT-2's residual scaling: each
block adds a small update), and the final norm's scale makes the logits' standard deviation LOGIT_STD (4).

Score (`evaluate`): 1 - the mean KL divergence KL(fp32 || candidate) of the next-token distributions, in
nats per token, over EVAL_BATCHES fixed batches of seeded random tokens of the example's shape (so a
compiled candidate scores with the graph it is timed with). The fp32 distributions are computed once per
process from a fresh fp32 copy and kept on the CPU; on a GPU that copy runs with only one decoder layer on
the device at a time, so the device never holds a second fp32 model.
"""

from __future__ import annotations

import copy
import math
import os

import torch
from torch import nn

SIZES = {
    # hidden, layers, FFN, heads, vocabulary, batch, sequence
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 vocab_size=512, batch=2, seq_len=32),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               vocab_size=32000, batch=4, seq_len=512),
}
SEED = 0
EMBED_STD = 1.0  # token embeddings (transformers draws them with std initializer_range, 0.02)
LOGIT_STD = 4.0  # standard deviation of the fp32 logits (see the docstring)
EVAL_BATCHES = 2
_BUILT: dict[str, nn.Module] = {}  # size -> the seeded fp32 model, drawn once per process (1b: 20-50 s), copied after
_REFERENCE: dict[str, list[torch.Tensor]] = {}  # size -> fp32 log-probabilities per eval batch, on the CPU


def size() -> str:
    name = os.environ.get("AUTOPREC_LLAMA_SIZE", "tiny")
    if name not in SIZES:
        raise ValueError(f"AUTOPREC_LLAMA_SIZE={name!r}: use one of {', '.join(SIZES)}")
    return name


def config():
    from transformers import LlamaConfig

    s = SIZES[size()]
    return LlamaConfig(hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
                       intermediate_size=s["intermediate_size"], num_attention_heads=s["num_attention_heads"],
                       num_key_value_heads=s["num_attention_heads"], vocab_size=s["vocab_size"],
                       max_position_embeddings=s["seq_len"], tie_word_embeddings=False, use_cache=False,
                       attn_implementation="sdpa")


def build_model() -> nn.Module:
    """A fresh fp32 model on the CPU: a copy of the one drawn the first time (same weights every time)."""
    if size() not in _BUILT:
        _BUILT[size()] = _draw()
    return copy.deepcopy(_BUILT[size()])


def _draw() -> nn.Module:
    from transformers import LlamaForCausalLM

    cfg = config()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, EMBED_STD)
        residual_scale = 1.0 / math.sqrt(2 * cfg.num_hidden_layers)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(residual_scale)
            layer.mlp.down_proj.weight.mul_(residual_scale)
        # the final norm's output has unit RMS per position and each logit sums hidden_size products with
        # weights of std initializer_range: this norm scale gives logits of std LOGIT_STD
        model.model.norm.weight.fill_(LOGIT_STD / (cfg.initializer_range * math.sqrt(cfg.hidden_size)))
    return model


def _tokens(seed: int) -> dict[str, torch.Tensor]:
    s = SIZES[size()]
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, s["vocab_size"], (s["batch"], s["seq_len"]), generator=generator)}


def example_inputs() -> dict[str, torch.Tensor]:
    return _tokens(1000)


def eval_batches() -> list[dict[str, torch.Tensor]]:
    return [_tokens(2000 + i) for i in range(EVAL_BATCHES)]


def _logits(outputs) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


def _offloaded(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device` except its decoder layers, each moved there only while it runs."""
    layers = model.model.layers
    for name, child in model.model.named_children():
        if name != "layers":
            child.to(device)
    model.lm_head.to(device)

    def load(module, _args):
        module.to(device)

    def unload(module, _args, _out):
        module.to("cpu")

    for layer in layers:
        layer.register_forward_pre_hook(load)
        layer.register_forward_hook(unload)
    return model


def reference_log_probs(device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The fp32 model's next-token log-probabilities on eval_batches(), on the CPU, computed once."""
    key = size()
    if key not in _REFERENCE:
        device = torch.device(device)
        model = build_model()
        if device.type != "cpu":
            model = _offloaded(model, device)
        refs = []
        with torch.inference_mode():
            for batch in eval_batches():
                logits = _logits(model(**{k: v.to(device) for k, v in batch.items()}))
                refs.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        del model
        _REFERENCE[key] = refs
    return _REFERENCE[key]


def evaluate(model: nn.Module, device: torch.device) -> float:
    """1 - mean KL(fp32 || model) of the next-token distributions, nats per token (1.0 for the fp32 model)."""
    device = torch.device(device)
    refs = reference_log_probs(device)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch, ref in zip(eval_batches(), refs):
            logits = _logits(model(**{k: v.to(device) for k, v in batch.items()}))
            for row in range(logits.shape[0]):  # one sequence at a time: a few vocabulary-wide temporaries
                log_q = torch.log_softmax(logits[row].float(), dim=-1)
                log_p = ref[row].to(device)
                total += float((log_p.exp() * (log_p - log_q)).sum())
                count += log_p.shape[0]
    return 1.0 - total / count
