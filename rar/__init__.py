"""RAR (bytedance/1d-tokenizer): the AR generator and its MaskGIT-VQGAN tokenizer."""
from .model import RAR
from .vqgan import MaskGITVQGAN, load_vqgan

__all__ = ["RAR", "MaskGITVQGAN", "load_vqgan"]
