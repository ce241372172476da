"""The embedded default source model: a small byte-level Llama shipped under ``assets/``.

It is trained by ``python -m gka_kernels.hybrid.train_embedded`` on the Python standard
library's sources (see ``data.stdlib_files``) and lets ``gka-prime`` run with no download.
"""

from __future__ import annotations

from pathlib import Path

from .tokenizer import ByteTokenizer

EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "embedded_llama"
CONTEXT = 256


def embedded_config_kwargs() -> dict:
    """``LlamaConfig`` keyword arguments of the embedded model (about 0.8M parameters)."""
    tok = ByteTokenizer()
    return dict(
        vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def embedded_available() -> bool:
    """True when the trained embedded model is present in the package."""
    return (EMBEDDED_DIR / "model.safetensors").is_file() and (EMBEDDED_DIR / "config.json").is_file()


def load_embedded_model(dtype=None):
    """The embedded ``LlamaForCausalLM`` (float32 unless ``dtype``) in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    if not embedded_available():
        raise FileNotFoundError(
            f"the embedded model is missing from {EMBEDDED_DIR}; build it with "
            "`python -m gka_kernels.hybrid.train_embedded`")
    model = LlamaForCausalLM.from_pretrained(EMBEDDED_DIR, local_files_only=True,
                                             dtype=dtype or torch.float32)
    return model.eval()
