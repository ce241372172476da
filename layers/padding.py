"""Padding masks -> packed variable-length batches (FlashAttention ``cu_seqlens``) and back.

A layer that receives ``attention_mask`` (1 = token, 0 = padding; left, right or any pattern)
drops the padding positions, packs the remaining tokens of every row one after the other into a
single ``[1, L, ...]`` sequence with ``cu_seqlens`` marking the rows, runs the mixer in that
layout (each row keeps its own convolution and recurrent state, nothing leaks between rows) and
scatters the result back to ``[B, T, ...]`` with zeros at the padding positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gka_kernels.common.checks import check_tensor


def normalize_mask(attention_mask: object, batch_size: int, seq_len: int) -> torch.Tensor | None:
    """Validate ``attention_mask`` and return a bool ``[B, T]`` mask, or ``None`` when it is absent.

    The mask may be ``[B, T]`` or, as passed during generation, ``[B, S]`` with ``S >= T`` covering
    earlier tokens as well; then its last ``T`` columns describe the current tokens. Any dtype;
    nonzero entries are tokens.
    """
    if attention_mask is None:
        return None
    m = check_tensor("attention_mask", attention_mask, ndim=2)
    if m.shape[0] != batch_size or m.shape[1] < seq_len:
        raise ValueError(
            f"attention_mask: expected shape [{batch_size}, S] with S >= {seq_len} (the batch size and "
            f"number of tokens of hidden_states), got {list(m.shape)}")
    return m[:, m.shape[1] - seq_len:] != 0


@dataclass(frozen=True)
class Packing:
    """Positions of the tokens of a padded ``[B, T]`` batch inside the packed ``[1, L]`` layout.

    indices:    ``[L]`` int64, flat positions (``b * T + t``) of the tokens, row by row.
    cu_seqlens: ``[B + 1]`` int32, row ``b`` occupies packed positions ``cu_seqlens[b]:cu_seqlens[b+1]``.
    max_len:    the largest number of tokens in one row.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    batch_size: int
    seq_len: int
    max_len: int

    @staticmethod
    @torch.compiler.disable
    def from_mask(mask: torch.Tensor) -> "Packing | None":
        """Packing for a bool ``[B, T]`` mask; ``None`` when every position is a token.

        Reads the mask on the host (data-dependent sizes), so ``torch.compile`` runs it eagerly."""
        if bool(mask.all()):
            return None
        B, T = mask.shape
        lengths = mask.sum(dim=1, dtype=torch.int32)
        cu = torch.zeros(B + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = torch.cumsum(lengths, dim=0)
        indices = torch.nonzero(mask.reshape(-1), as_tuple=False).squeeze(1)
        return Packing(indices=indices, cu_seqlens=cu, batch_size=B, seq_len=T, max_len=int(lengths.max()))

    @property
    def num_tokens(self) -> int:
        return self.indices.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, *rest]`` -> ``[1, L, *rest]`` (the tokens only, row after row)."""
        flat = x.reshape(self.batch_size * self.seq_len, *x.shape[2:])
        return flat.index_select(0, self.indices).unsqueeze(0)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """``[1, L, *rest]`` -> ``[B, T, *rest]`` with zeros at the padding positions."""
        rest = y.shape[2:]
        out = y.new_zeros(self.batch_size * self.seq_len, *rest).index_copy(0, self.indices, y[0])
        return out.view(self.batch_size, self.seq_len, *rest)
