"""AliTok (ali-vilab/alitok): the AR generator and its image tokenizer."""
from .model import ARModel

__all__ = ["ARModel"]
