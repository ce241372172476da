"""The layer pattern string ``hybrid_override_pattern`` (SPEC 7).

One token per decoder layer, joined by ``-``: ``*`` keeps the source attention, ``GKA``, ``GDN``
and ``M2`` name the state-space mixer that replaces it. Example for 4 layers: ``*-GKA-GKA-*``.
"""

from __future__ import annotations

ATTENTION = "*"
SSM_TOKENS = ("GKA", "GDN", "M2")
TOKENS = (ATTENTION, *SSM_TOKENS)
# CLI names of the mixers (``--ssm``) -> pattern tokens.
SSM_BY_NAME = {"gka": "GKA", "gdn": "GDN", "mamba2": "M2", "m2": "M2"}


def parse_pattern(pattern: str, num_layers: int | None = None) -> list[str]:
    """Split and validate a pattern; ``num_layers`` (when given) must match its length."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"hybrid_override_pattern: expected a non-empty string like '*-GKA-GKA-*', got {pattern!r}")
    tokens = pattern.split("-")
    bad = [t for t in tokens if t not in TOKENS]
    if bad:
        raise ValueError(
            f"hybrid_override_pattern: unknown token(s) {bad} in {pattern!r}; allowed tokens are "
            f"{list(TOKENS)} joined by '-'")
    if num_layers is not None and len(tokens) != num_layers:
        raise ValueError(
            f"hybrid_override_pattern: expected {num_layers} tokens (one per layer), got {len(tokens)} in {pattern!r}")
    return tokens


def format_pattern(tokens: list[str]) -> str:
    """Join tokens into a pattern string (validating them)."""
    return "-".join(parse_pattern("-".join(tokens)))


def ssm_token(name: str) -> str:
    """Pattern token of an SSM given by CLI name (``gka``, ``gdn``, ``mamba2``) or token."""
    key = name.lower()
    if key in SSM_BY_NAME:
        return SSM_BY_NAME[key]
    if name in SSM_TOKENS:
        return name
    raise ValueError(f"ssm: expected one of {sorted(set(SSM_BY_NAME))}, got {name!r}")


def pattern_from_layers(num_layers: int, ssm_layers: list[int], ssm: str) -> str:
    """Pattern with ``ssm`` at the indices ``ssm_layers`` and attention elsewhere."""
    token = ssm_token(ssm)
    chosen = set(ssm_layers)
    bad = sorted(i for i in chosen if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"ssm_layers: indices {bad} out of range for {num_layers} layers")
    return "-".join(token if i in chosen else ATTENTION for i in range(num_layers))


def count_from_ratio(num_layers: int, ratio: float) -> int:
    """Number of layers to replace for an SSM ``ratio`` in [0, 1] (rounded to nearest)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio: expected a fraction of layers in [0, 1], got {ratio}")
    return int(round(ratio * num_layers))


def uniform_layers(num_layers: int, count: int) -> list[int]:
    """``count`` layer indices spread evenly over ``num_layers`` (centers of equal bins)."""
    if not 0 <= count <= num_layers:
        raise ValueError(f"count: expected 0..{num_layers} layers to replace, got {count}")
    return sorted({int((i + 0.5) * num_layers / count) for i in range(count)})
