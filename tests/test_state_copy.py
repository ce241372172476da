"""The CUDA state-pool copy (csrc/state_copy.cu) against plain indexing."""

import pytest
import torch

import gka_kernels


def test_state_copy_rejects_bad_input_before_launch():
    from gka_kernels.cuda import state_copy

    if not gka_kernels.cuda.extension_available():
        with pytest.raises(RuntimeError, match="gka_kernels._C is not available"):
            state_copy(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0]), torch.tensor([1]))
        return
    with pytest.raises(TypeError, match="^src: expected dtype"):
        state_copy(torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 3), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="^dst: expected slots of shape"):
        state_copy(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"^src_indices: entries must be in \[-1, 2\)"):
        state_copy(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([2]), torch.tensor([1]))


@pytest.mark.gpu
@pytest.mark.parametrize("slot_shape", [(4, 32, 32), (3, 5, 7)])
def test_state_copy_matches_indexing(slot_shape):
    from gka_kernels.cuda import state_copy

    src = torch.randn(6, *slot_shape, device="cuda")
    dst = torch.randn(5, *slot_shape, device="cuda")
    src_idx = torch.tensor([3, -1, 0, 5], device="cuda")
    dst_idx = torch.tensor([0, 2, 4, -1], device="cuda")
    expected = dst.clone()
    expected[0] = src[3]
    expected[4] = src[0]
    state_copy(src, dst, src_idx, dst_idx)
    torch.cuda.synchronize()
    assert torch.equal(dst, expected)
