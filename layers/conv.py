"""Causal depthwise short convolution with a decode cache (the ``*_conv1d`` modules of the layers).

For channel ``c`` with kernel ``w[c, 0, :]`` of width ``W`` and input ``x``:

    y[t, c] = act( sum_{i=0}^{W-1} w[c, 0, i] * x[t - (W-1) + i, c] + bias[c] )

where positions before the start of a sequence read the conv state: the last ``W - 1`` inputs of
the previous call (zeros for a fresh sequence). The state is ``[N, C, W-1]``, oldest column first.
The module is an ``nn.Conv1d`` (``weight [C, 1, W]``, optional ``bias [C]``) so that published
checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv1d over ``[B, T, C]`` with optional SiLU and conv-state cache.

    Args:
        hidden_size: channels ``C``.
        kernel_size: width ``W`` (>= 1); the state keeps ``W - 1`` columns.
        bias: whether the conv has a bias.
        activation: ``"silu"`` or ``None``.
    """

    def __init__(self, hidden_size: int, kernel_size: int = 4, bias: bool = False,
                 activation: str | None = "silu", device=None, dtype=None) -> None:
        if activation not in ("silu", None):
            raise ValueError(f"activation: expected 'silu' or None, got {activation!r}")
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=0,
                         bias=bias, device=device, dtype=dtype)
        self.activation = activation

    @property
    def state_width(self) -> int:
        return self.kernel_size[0] - 1

    def _act(self, y: torch.Tensor) -> torch.Tensor:
        return F.silu(y) if self.activation == "silu" else y

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Convolve a chunk of tokens.

        Args:
            x: ``[B, T, C]``, or packed ``[1, L, C]`` when ``cu_seqlens`` is given.
            state: ``[N, C, W-1]`` inputs preceding each sequence (``None`` = zeros); ``N`` is
                ``B``, or ``len(cu_seqlens) - 1``.
            cu_seqlens: ``[N+1]`` offsets of the packed sequences (empty sequences allowed).

        Returns:
            ``(y [same as x], contiguous, new_state [N, C, W-1])``; ``new_state`` holds the last ``W-1`` inputs
            of each sequence, preceded by its old state where the sequence is shorter than that.
        """
        if cu_seqlens is None:
            if x.shape[1] == 1 and state is not None:
                y, new_state = self.step(x[:, 0], state)
                return y.unsqueeze(1), new_state
            return self._forward_batch(x, state)
        return self._forward_packed(x, state, cu_seqlens)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode token per sequence: ``x [B, C]``, ``state [B, C, W-1]`` -> ``(y [B, C], new_state)``."""
        # Accumulate in float32 (float64 for float64) and round once, as F.conv1d does on the
        # chunked path: bf16 products summed in bf16 would round W+1 times per output.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [B, C, W]
        y = (window.to(acc) * self.weight[:, 0, :].to(acc)).sum(-1)
        if self.bias is not None:
            y = y + self.bias.to(acc)
        return self._act(y.to(x.dtype)), window[..., 1:].to(state.dtype)

    def _forward_batch(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        Wm1 = self.state_width
        xt = x.transpose(1, 2)  # [B, C, T]
        prev = x.new_zeros(B, C, Wm1) if state is None else state.to(x.dtype)
        ext = torch.cat([prev, xt], dim=-1)  # [B, C, W-1+T]
        y = F.conv1d(ext, self.weight, self.bias, groups=C).transpose(1, 2).contiguous()
        new_state = ext[..., ext.shape[-1] - Wm1:]
        return self._act(y), new_state.to(state.dtype if state is not None else x.dtype)

    def _forward_packed(self, x: torch.Tensor, state: torch.Tensor | None,
                        cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Give every sequence its own W-1 state columns in front of its tokens; one long
        # depthwise conv over that layout never mixes two sequences.
        L, C = x.shape[1], x.shape[2]
        Wm1 = self.state_width
        N = cu_seqlens.numel() - 1
        dev = x.device
        cu = cu_seqlens.to(torch.int64)
        lengths = cu[1:] - cu[:-1]
        seq_of_token = torch.repeat_interleave(torch.arange(N, device=dev), lengths, output_size=L)
        token_pos = torch.arange(L, device=dev) + (seq_of_token + 1) * Wm1
        col = torch.arange(Wm1, device=dev)
        state_pos = (cu[:-1] + torch.arange(N, device=dev) * Wm1)[:, None] + col  # [N, W-1]
        prev = x.new_zeros(N, Wm1, C) if state is None else state.to(x.dtype).transpose(1, 2)
        ext = x.new_zeros(L + N * Wm1, C)
        ext = ext.index_copy(0, token_pos, x[0]).index_copy(0, state_pos.reshape(-1), prev.reshape(-1, C))
        y = F.conv1d(ext.t().unsqueeze(0), self.weight, self.bias, groups=C)[0].t()  # [L + (N-1)(W-1), C]
        y = y.index_select(0, token_pos - Wm1)  # [L, C], contiguous
        last = (cu[1:] + torch.arange(N, device=dev) * Wm1)[:, None] + col  # last W-1 of each segment
        new_state = ext.index_select(0, last.reshape(-1)).view(N, Wm1, C).transpose(1, 2)
        return self._act(y).unsqueeze(0), new_state.to(state.dtype if state is not None else x.dtype)
