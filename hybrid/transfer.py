"""Priming, stage 0: build a hybrid from a source Transformer and transfer its attention weights
into the SSM mixers (SPEC 7).

Per replaced layer, with ``W_Q [H*D, hidden]``, ``W_K, W_V [HKV*D, hidden]``, ``W_O [hidden, H*D]``:

- GKA / GDN: ``q_proj <- W_Q``, ``k_proj <- W_K``, ``v_proj <- W_V``, ``o_proj <- W_O``,
  ``g_proj <- 0.5 * (W_O^T + repeat_interleave(W_V, H/HKV, dim=0))`` (rows repeated).
- Mamba2: ``in_proj`` rows ``[z, x, B, C, dt]``: ``x <- W_V``, ``B <- W_K``, ``C <- W_Q``,
  ``z <-`` the gate rule above, ``dt`` fresh; ``out_proj <- W_O``.

RoPE and Qwen3's q/k norms are not carried; attention biases (Qwen2) cannot be carried. Every
other mixer parameter (convs, gates, ``A_log``, ``dt_bias``, norms) keeps its fresh initialization.
Everything outside the replaced attention modules (embeddings, MLPs/experts, norms, attention
layers that stay) is copied unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration import HybridConfig
from .families import get_family
from .modeling import HybridForCausalLM
from .pattern import ATTENTION, parse_pattern


def gate_init(w_o: torch.Tensor, w_v: torch.Tensor, groups: int) -> torch.Tensor:
    """Output-gate initialization ``0.5 * (W_O^T + repeat_interleave(W_V, groups, dim=0))``
    (``[H*D, hidden]``)."""
    return 0.5 * (w_o.t() + w_v.repeat_interleave(groups, dim=0))


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


def _attention_extras(attn: nn.Module) -> list[str]:
    """Source attention parameters that an SSM cannot carry (biases, q/k norms)."""
    dropped = []
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        bias = getattr(getattr(attn, name), "bias", None)
        if bias is not None:
            dropped.append(f"{name}.bias")
    for name in ("q_norm", "k_norm"):
        if getattr(attn, name, None) is not None:
            dropped.append(name)
    return dropped


@torch.no_grad()
def transfer_attention(attn: nn.Module, mixer: nn.Module, token: str, num_heads: int,
                       num_kv_heads: int) -> tuple[list[str], list[str]]:
    """Copy one source attention module's weights into ``mixer``.

    Returns ``(copied, fresh)``: ``"<param> <- <rule> [shape]"`` for every mixer tensor written, and
    the names of the mixer parameters left at their fresh initialization.
    """
    w_q, w_k, w_v, w_o = (getattr(attn, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    groups = num_heads // num_kv_heads
    gate = gate_init(w_o, w_v, groups)
    gate_rule = f"0.5*(W_O^T + repeat_interleave(W_V, {groups}))"
    params = dict(mixer.named_parameters())
    if token in ("GKA", "GDN"):
        writes = [("q_proj", w_q, "W_Q"), ("k_proj", w_k, "W_K"), ("v_proj", w_v, "W_V"),
                  ("o_proj", w_o, "W_O"), ("g_proj", gate, gate_rule)]
        for name, value, _ in writes:
            params[f"{name}.weight"].copy_(value)
        written = {f"{name}.weight" for name, _, _ in writes}
    elif token == "M2":
        H, HKV, P, N = num_heads, num_kv_heads, mixer.head_dim, mixer.state_size
        if N != P:
            raise ValueError(f"Mamba2 priming needs state_size == head_dim (C <- W_Q), got N={N}, P={P}")
        z, x, b, c, _dt = mixer.in_proj.weight.split([H * P, HKV * P, HKV * N, H * N, H], dim=0)
        writes = [("in_proj[z]", gate, gate_rule), ("in_proj[x]", w_v, "W_V"), ("in_proj[B]", w_k, "W_K"),
                  ("in_proj[C]", w_q, "W_Q"), ("out_proj", w_o, "W_O")]
        for dst, (_, value, _) in zip((z, x, b, c, mixer.out_proj.weight), writes):
            dst.copy_(value)
        written = {"out_proj.weight"}
        params = {("in_proj[dt]" if n == "in_proj.weight" else n): p for n, p in params.items()}
    else:
        raise ValueError(f"token: expected GKA, GDN or M2, got {token!r}")
    copied = [f"{name} <- {rule} [{_shape(value)}]" for name, value, rule in writes]
    return copied, [n for n in params if n not in written]


def to_device_dtype(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move ``model`` to ``device`` and cast its parameters and saved buffers to ``dtype``, as
    ``from_pretrained(..., dtype=dtype)`` builds a model: non-persistent buffers (RoPE ``inv_freq``,
    computed in float32 at construction and not saved) keep their dtype. A plain ``model.to(dtype)``
    would round ``inv_freq`` to bfloat16, so a converted hybrid and the same hybrid saved and
    reloaded would rotate queries and keys differently."""
    kept = [(module, name, buf) for module in model.modules() for name, buf in module._buffers.items()
            if buf is not None and name in module._non_persistent_buffers_set]
    model.to(device=device, dtype=dtype)
    for module, name, buf in kept:
        module._buffers[name] = buf.to(device)
    return model


def check_source(source: nn.Module) -> None:
    """Refuse sources that are not a supported decoder-only causal LM (clear message)."""
    config = getattr(source, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(f"source: expected a transformers causal LM with a config, got {type(source).__name__}")
    family = get_family(model_type)
    if not isinstance(source, family.causal_lm_cls()):
        raise ValueError(f"source: expected a {family.causal_lm_class} (the causal LM of model type "
                         f"{model_type!r}), got {type(source).__name__}")


@torch.no_grad()
def convert_to_hybrid(source: nn.Module, pattern: str, ssm_config: dict | None = None,
                      source_name: str | None = None, mixer_backend: str = "auto"
                      ) -> tuple[HybridForCausalLM, list[str]]:
    """Priming stage 0: a ``HybridForCausalLM`` with the layers of ``pattern`` replaced.

    Args:
        source: a Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE ``*ForCausalLM``.
        pattern: ``hybrid_override_pattern`` with one token per source layer.
        ssm_config: mixer options per token (see ``HybridConfig``).
        source_name: provenance string saved in the config.
        mixer_backend: ``backend`` of the mixers.

    Returns:
        ``(hybrid, log)``: the hybrid on the source's device and dtype, and one log line per
        layer saying what was copied, what was freshly initialized and what was dropped.
    """
    check_source(source)
    cfg = source.config
    tokens = parse_pattern(pattern, cfg.num_hidden_layers)
    text_config = cfg.to_dict()
    config = HybridConfig(text_config=text_config, hybrid_override_pattern=pattern, ssm_config=ssm_config,
                          source_model=source_name)
    config.text_config._attn_implementation = cfg._attn_implementation
    ref = next(source.parameters())
    hybrid = to_device_dtype(HybridForCausalLM(config, mixer_backend=mixer_backend), ref.device, ref.dtype)
    replaced = {i for i, t in enumerate(tokens) if t != ATTENTION}
    source_sd = source.state_dict()
    keep = {k: v for k, v in source_sd.items()
            if not any(k.startswith(f"model.layers.{i}.self_attn.") for i in replaced)}
    missing, unexpected = hybrid.load_state_dict(keep, strict=False)
    mixer_keys = {f"model.layers.{i}.self_attn.mixer." for i in replaced}
    bad_missing = [k for k in missing if not any(k.startswith(p) for p in mixer_keys)]
    if unexpected or bad_missing:
        raise RuntimeError(f"weight copy mismatch: unexpected {unexpected}, missing {bad_missing}")
    log = []
    H, HKV = cfg.num_attention_heads, cfg.num_key_value_heads
    for i, token in enumerate(tokens):
        if token == ATTENTION:
            log.append(f"layer {i:>3} *   : attention kept (all weights copied)")
            continue
        attn = source.model.layers[i].self_attn
        mixer = hybrid.model.layers[i].self_attn.mixer
        copied, fresh = transfer_attention(attn, mixer, token, H, HKV)
        dropped = ["RoPE"] + _attention_extras(attn)
        notes = []
        if any(d.endswith(".bias") for d in dropped):
            notes.append("attention biases cannot be carried into the SSM (its projections have no bias)")
        line = (f"layer {i:>3} {token:<4}: copied {', '.join(copied)}; "
                f"fresh {', '.join(fresh)}; not carried {', '.join(dropped)}")
        if notes:
            line += "; NOTE " + "; ".join(notes)
        log.append(line)
    hybrid.eval()
    return hybrid, log
