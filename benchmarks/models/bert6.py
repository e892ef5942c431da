"""BERT with 6 layers from BertConfig (see bert_from_config.py); a model.py for autoprec."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bert_from_config import eval_inputs, example_inputs, make  # noqa: E402

__all__ = ["build_model", "example_inputs", "eval_inputs"]


def build_model():
    return make(6)
