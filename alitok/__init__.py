"""AliTok (ali-vilab/alitok): the AR generator and its image tokenizer."""
from .model import ARModel
from .tokenizer import AliTokTokenizer, load_tokenizer

__all__ = ["ARModel", "AliTokTokenizer", "load_tokenizer"]
