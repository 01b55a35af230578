import numpy as np
import torch

import lowbit


def test_quantize_e4m3_matches_torch_cast_on_random_values():
    x = torch.randn(10000) * 10
    expected = x.to(torch.float8_e4m3fn).float()
    assert torch.equal(lowbit.quantize(x, "e4m3fn"), expected)


def test_numpy_in_numpy_out():
    x = np.linspace(-3, 3, 101, dtype=np.float32)
    q = lowbit.quantize(x, "int4", scale=0.5)
    assert isinstance(q, np.ndarray) and q.dtype == np.float32
    assert set(np.unique(q / 0.5)) <= set(range(-8, 8))
