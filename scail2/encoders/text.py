"""The umT5 text encoder (transformers `UMT5EncoderModel` + its tokenizer), padded the Wan way.

Each caption is tokenised to `text_len` tokens (512 for Wan2.1/SCAIL-2; right padding, truncation, the EOS
token appended), encoded with the attention mask, and every position past the caption's real length is set
to exactly zero. This matches the Wan reference code and diffusers' Wan pipelines, which cut the output to
the real length and pad it back with zeros. The transformer's cross-attention then splits its context at
``len - text_len``, so the length must stay fixed.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from scail2.encoders._files import TEXT_ENCODER_FILES, TOKENIZER_FILES, require_files

if TYPE_CHECKING:
    from transformers import UMT5EncoderModel

TEXT_LEN = 512  # umT5 context length of Wan2.1 / SCAIL-2


def clean_prompt(text: str) -> str:
    """Unescape HTML entities (twice, for doubly escaped scraped captions) and collapse whitespace.

    The reference pipelines also run `ftfy.fix_text` (mojibake repair) first; ftfy is not a dependency of this
    project, so captions with broken encodings should be repaired before they reach the encoder.
    """
    return " ".join(html.unescape(html.unescape(text)).split())


class TextEncoder(nn.Module):
    """Frozen umT5 encoder: `encode(prompts)` -> (B, text_len, dim), zero past each prompt's real length.

    Use bfloat16 or float32 for umT5 (float16 overflows in T5 feed-forward layers). The wrapped model stays in
    eval mode (no dropout) even if a parent module calls `.train()`.
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: Any, text_len: int = TEXT_LEN) -> None:
        super().__init__()
        if text_len < 1:
            raise ValueError(f"text_len is {text_len}; need a positive token count (Wan uses 512)")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        # umT5 of "", keyed by (device, dtype, text_len): recomputed when the encoder moves or changes dtype.
        self._null_cache: tuple[tuple[torch.device, torch.dtype, int], torch.Tensor] | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        tokenizer_path: str | Path | None = None,
        *,
        text_len: int = TEXT_LEN,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> TextEncoder:
        """Load `model_path` and the tokenizer from `tokenizer_path` (e.g. ``tokenizer/``; defaults to
        `model_path` when that is a folder).

        `model_path` is a transformers folder (``config.json`` + ``model.safetensors``, e.g. ``text_encoder/``) or
        the original Wan2.1 file ``models_t5_umt5-xxl-enc-bf16.pth`` (then `tokenizer_path` is required: the
        ``umt5-xxl/`` folder of the release), see ``scail2.encoders.wan_files``. Pickle files are read with
        ``weights_only=True``."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_path = Path(model_path)
        if model_path.is_file():
            if tokenizer_path is None:
                raise FileNotFoundError(
                    f"{model_path} is a single Wan umT5 file; pass tokenizer_path= the umT5 tokenizer folder "
                    "(umt5-xxl/ in the SCAIL-2 and Wan2.1 releases)"
                )
            from scail2.encoders.wan_files import load_wan_t5

            tokenizer_path = require_files(Path(tokenizer_path), TOKENIZER_FILES)
            model = load_wan_t5(model_path, dtype=dtype)
        else:
            model_path = require_files(model_path, TEXT_ENCODER_FILES)
            tokenizer_path = require_files(Path(tokenizer_path or model_path), TOKENIZER_FILES)
            model = UMT5EncoderModel.from_pretrained(
                model_path, dtype=dtype, use_safetensors=True, local_files_only=True
            )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        encoder = cls(model, tokenizer, text_len=text_len)
        return encoder.to(device) if device is not None else encoder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        """Width of the embeddings (4096 for umT5-XXL)."""
        return int(self.model.config.d_model)

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen: umT5's config enables dropout, which must never switch on under a training parent.
        return super().train(False)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, each (B, text_len) int64 on CPU, after `clean_prompt`."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts is the string {prompts[:40]!r}; pass a list of strings, e.g. [prompt]")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass at least one string (\"\" for the unconditional embedding)")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts contains non-strings ({sorted(set(bad))}); pass a list of str")
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            padding_side="right",  # zeroing below assumes the real tokens come first
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Encode captions.

        Args:
            prompts: B strings ("" is allowed and gives the unconditional embedding).
        Returns:
            (B, text_len, dim) in the encoder's dtype, on its device; rows past each prompt's real token count
            (its tokens plus EOS) are exactly zero.
        """
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), 0.0)

    def null_embedding(self) -> torch.Tensor:
        """umT5 of the empty string, (1, text_len, dim): the unconditional context for classifier-free guidance
        and the replacement for dropped captions. Computed once per device/dtype; a fresh copy is returned so
        callers may modify it."""
        key = (self.device, self.dtype, self.text_len)
        if self._null_cache is None or self._null_cache[0] != key:
            self._null_cache = (key, self.encode([""]))
        return self._null_cache[1].clone()
