"""Bad-input rules of SPEC 2, checked on the shared validators every op uses."""

import pytest
import torch

from gka_kernels.common.checks import (
    check_activation,
    check_cu_seqlens,
    check_gate,
    check_head_dim,
    check_index_tensor,
    check_positive_int,
    check_qkv,
    check_scale,
    check_state,
)


def _qkv(B=2, T=5, H=4, HKV=2, K=8, V=6, dtype=torch.float32):
    return (torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, HKV, K, dtype=dtype),
            torch.randn(B, T, HKV, V, dtype=dtype))


def test_valid_qkv_dims():
    q, k, v = _qkv()
    dims = check_qkv(q, k, v)
    assert (dims.B, dims.T, dims.H, dims.HKV, dims.K, dims.V, dims.N) == (2, 5, 4, 2, 8, 6, 2)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_not_a_tensor(which):
    args = dict(zip("qkv", _qkv()))
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=f"^{which}: expected a torch.Tensor"):
        check_qkv(**args)


def test_wrong_rank():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^q: expected 4 dimensions, got 3"):
        check_qkv(q[0], k, v)


def test_wrong_dtype_on_cpu():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"^q: expected dtype in \(float32, float64\), got torch.bfloat16"):
        check_qkv(q.bfloat16(), k, v)


def test_mixed_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"^k: expected dtype torch.float32 \(the dtype of q\)"):
        check_qkv(q, k.double(), v.float())


def test_heads_not_divisible():
    q, k, v = _qkv(H=4, HKV=3)
    with pytest.raises(ValueError, match=r"^k: number of heads 3 must divide the 4 heads of q"):
        check_qkv(q, k, v)


def test_mismatched_lengths_and_dims():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^k: expected shape \[2, 5, HKV, 8\]"):
        check_qkv(q, k[:, :4], v)
    with pytest.raises(ValueError, match=r"^v: expected shape \[2, 5, 2, V\]"):
        check_qkv(q, k, v[:, :, :1])


def test_head_dim_limit():
    q, k, v = _qkv(K=300)
    with pytest.raises(ValueError, match=r"^q: head dim must be in \[1, 256\].*got 300"):
        check_qkv(q, k, v)
    with pytest.raises(ValueError, match="power of two"):
        check_head_dim("k", 100, 256, power_of_two=True)


@pytest.mark.parametrize(
    "cu, batch, msg",
    [
        (torch.tensor([0, 3, 5]), 2, "requires batch size 1"),
        (torch.tensor([1, 3, 5]), 1, "must start at 0, got 1"),
        (torch.tensor([0, 3, 4]), 1, "must end at T=5, got 4"),
        (torch.tensor([0, 4, 3, 5]), 1, "must be non-decreasing"),
        (torch.tensor([5]), 1, "at least 2 entries"),
        (torch.tensor([[0, 5]]), 1, "expected 1 dimensions"),
    ],
)
def test_bad_cu_seqlens(cu, batch, msg):
    with pytest.raises(ValueError, match=f"^cu_seqlens: .*{msg}"):
        check_cu_seqlens(cu, batch=batch, total_len=5, device=torch.device("cpu"))


def test_cu_seqlens_dtype_and_count():
    with pytest.raises(TypeError, match="^cu_seqlens: expected dtype in \\(int32, int64\\)"):
        check_cu_seqlens(torch.tensor([0.0, 5.0]), batch=1, total_len=5, device=torch.device("cpu"))
    cu = torch.tensor([0, 1, 1, 5], dtype=torch.int32)  # empty sequences are allowed
    assert check_cu_seqlens(cu, batch=1, total_len=5, device=torch.device("cpu")) == 3


def test_state_shape_and_dtype():
    s = torch.zeros(2, 4, 8, 6)
    assert check_state("initial_state", s, (2, 4, 8, 6), device=s.device) is s
    with pytest.raises(ValueError, match=r"^initial_state: expected shape \[2, 4, 8, 6\], got \[2, 4, 6, 8\]"):
        check_state("initial_state", s.transpose(2, 3), (2, 4, 8, 6), device=s.device)
    with pytest.raises(TypeError, match="^initial_state: expected dtype in \\(float32, float64\\)"):
        check_state("initial_state", s.half(), (2, 4, 8, 6), device=s.device)


def test_gate_shape():
    q, k, v = _qkv()
    dims = check_qkv(q, k, v)
    with pytest.raises(ValueError, match=r"^g: expected shape \[2, 5, 4\], got \[2, 5, 2\]"):
        check_gate("g", torch.zeros(2, 5, 2), dims, q)


def test_index_tensor_range():
    idx = torch.tensor([0, -1, 3])
    assert check_index_tensor("state_indices", idx, device=idx.device, upper=4) == 3
    with pytest.raises(ValueError, match=r"^state_indices: entries must be in \[-1, 3\)"):
        check_index_tensor("state_indices", idx, device=idx.device, upper=3)
    # sync=False checks metadata only (CUDA-graph safe)
    assert check_index_tensor("state_indices", idx, device=idx.device, upper=3, sync=False) == 3


def test_scalars():
    assert check_scale(None, 16) == 0.25
    with pytest.raises(TypeError, match="^scale:"):
        check_scale("0.1", 16)
    with pytest.raises(ValueError, match="^scale: expected a finite number"):
        check_scale(float("nan"), 16)
    with pytest.raises(ValueError, match=r"^num_iter: expected an int in \[1, 64\], got 0"):
        check_positive_int("num_iter", 0, hi=64)
    with pytest.raises(TypeError, match="^num_iter: expected an int, got bool"):
        check_positive_int("num_iter", True, hi=64)


def test_activation_device_rule():
    with pytest.raises(ValueError, match="^x: expected 3 dimensions"):
        check_activation("x", torch.zeros(2, 2), ndim=3)
