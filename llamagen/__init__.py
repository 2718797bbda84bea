"""LlamaGen (FoundationVision/LlamaGen): the class-conditional GPT and its VQ-16 tokenizer."""
from .model import GPT, load_gpt
from .vq import VQModel, load_vq, resize_for_eval

__all__ = ["GPT", "load_gpt", "VQModel", "load_vq", "resize_for_eval"]
