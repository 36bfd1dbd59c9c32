"""Reference language models, written as ordinary PyTorch: the training method is chosen
only by :func:`dsf_compile.apply`."""

from .blocks import TransformerLikeRNN
from .cell_lm import HandWrittenGRU, HandWrittenGRULM
from .lm import RNNLanguageModel

__all__ = ["HandWrittenGRU", "HandWrittenGRULM", "RNNLanguageModel", "TransformerLikeRNN"]
