"""Prompt tokenisation and encoding from a local Hugging Face folder."""

from medsyn_xai.text.encoder import EncodedPrompt, TextEncoder, TextEncoderError, default_text_folder
from medsyn_xai.text.tokens import TokenRecord

__all__ = ["EncodedPrompt", "TextEncoder", "TextEncoderError", "TokenRecord", "default_text_folder"]
