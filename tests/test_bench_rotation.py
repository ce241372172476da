"""The kernel suite's decode cases rotate enough state sets that a small step is timed from DRAM,
not from L2 (PERF.md's measuring rule). CPU only: the case builders are replaced by counting fakes."""

from __future__ import annotations

import pytest

from bench import cases
from bench.cases import decode_set_bytes, decode_sets, make_cases, rotated_decode
from bench.shapes import SHAPES
from bench.timing import L2_BYTES, rotation_count


@pytest.mark.parametrize("op,params", [("gdn", {}), ("mamba2", {}), ("gka", {}), ("attention", {"context": 8192})])
def test_decode_1_working_set_exceeds_l2(op, params):
    per_set = decode_set_bytes(op, SHAPES["decode-1"], params)
    assert per_set < L2_BYTES  # one set alone would stay in L2
    assert decode_sets(op, SHAPES["decode-1"], params) == rotation_count(per_set)
    assert decode_sets(op, SHAPES["decode-1"], params) * per_set >= 4 * L2_BYTES


@pytest.mark.parametrize("op,params", [("gdn", {}), ("mamba2", {}), ("gka", {}), ("attention", {"context": 8192})])
def test_decode_64_state_is_one_set(op, params):
    """decode-64's state (128-256 MiB) or KV cache is larger than L2 already: no copies are made,
    as in every decode-64 measurement before the rotation existed."""
    assert decode_set_bytes(op, SHAPES["decode-64"], params) >= L2_BYTES
    assert decode_sets(op, SHAPES["decode-64"], params) == 1


def test_gka_decode_set_counts_both_states():
    sh = SHAPES["decode-1"]
    assert decode_set_bytes("gdn", sh, {}) == sh.heads * 128 * 128 * 4  # one fp32 state per head
    assert decode_set_bytes("gka", sh, {}) == 2 * decode_set_bytes("gdn", sh, {})


def test_rotated_decode_cycles_through_independent_sets():
    built = []

    def builder(impl, sh, mode, num_iter=30):
        i = len(built)
        built.append((impl, sh.name, mode, num_iter))
        return (lambda: i), []

    fn, leaves = rotated_decode(builder, "gka", "ours-cuda", SHAPES["decode-1"], "decode", {"num_iter": 10})
    n = decode_sets("gka", SHAPES["decode-1"], {})
    assert n > 1 and len(built) == n and leaves == []
    assert set(built) == {("ours-cuda", "decode-1", "decode", 10)}
    assert [fn() for _ in range(2 * n)] == list(range(n)) * 2


def test_make_cases_rotates_decode_cases_only(monkeypatch):
    calls = {"decode": 0, "chunk": 0}

    def fake_decode(impl, sh, mode):
        calls["decode"] += 1
        return (lambda: None), []

    def fake_chunk(impl, sh, mode):
        calls["chunk"] += 1
        return (lambda: None), []

    monkeypatch.setitem(cases.BUILDERS, ("gdn", "decode"), fake_decode)
    monkeypatch.setitem(cases.BUILDERS, ("gdn", "chunk"), fake_chunk)
    built = make_cases(["gdn"], [SHAPES["decode-1"], SHAPES["train-4k"]])
    decode = [c for c in built if c.mode == "decode" and c.impl == "ours"]
    chunk = [c for c in built if c.mode == "fwd" and c.impl == "ours"]
    decode[0].build()
    chunk[0].build()
    assert calls == {"decode": decode_sets("gdn", SHAPES["decode-1"], {}), "chunk": 1}
