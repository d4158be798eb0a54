"""fastbert: fused, padding-free kernels for BERT-family encoders.

>>> import fastbert
>>> model = fastbert.optimize(hf_bert_model)        # in place; same outputs, padding never computed
>>> fastbert.unoptimize(model)                      # back to the original forward

Without transformers: ``fastbert.Bert.from_pretrained(folder)`` loads a checkpoint folder and
runs the same padding-free encoder. Backends: see :mod:`fastbert.backends`.
"""

from fastbert import ops
from fastbert.backends import BACKENDS, use_backend
from fastbert.config import BertConfig, UnsupportedConfigError
from fastbert.hf import is_optimized, optimize, unoptimize
from fastbert.model import Bert

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Bert",
    "BertConfig",
    "UnsupportedConfigError",
    "is_optimized",
    "ops",
    "optimize",
    "unoptimize",
    "use_backend",
]
