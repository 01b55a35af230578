"""The peer benchmark's own checks (benchmarks/peer_gptq.py), without the peer installed."""
import importlib.util
from pathlib import Path

import torch

from lowbit.quant.spec import QuantSpec
from lowbit.quant.weight import WeightQuantizer

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_gptq.py"


def _bench():
    spec = importlib.util.spec_from_file_location("peer_gptq", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grid_check_accepts_int_grid_and_rejects_dense_weights():
    b = _bench()
    torch.manual_seed(0)
    scale = torch.rand(8, 2) + 0.1
    codes = torch.randint(-4, 4, (8, 2, 64)).float()
    W = (codes * scale[..., None]).reshape(8, 128)
    ok = b.grid_check({"l": W}, 3, {"l": scale})
    assert ok["on_grid"] and ok["max_distinct_per_group"] <= 8 and ok["int_range_used"][0] >= -4
    bad = b.grid_check({"l": torch.randn(8, 128)}, 3)
    assert not bad["on_grid"] and bad["max_distinct_per_group"] == 64
    off = b.grid_check({"l": W + 0.3 * scale.repeat_interleave(64, 1)}, 3, {"l": scale})
    assert not off["on_grid"]  # right number of values, but not multiples of the scale


def test_peer_grid_quantizer_has_the_finer_step_and_clips_the_extremes():
    b = _bench()
    spec = QuantSpec.parse("int3:g64")
    W = torch.linspace(-1, 1, 64).reshape(1, 64)
    Q, p = b.peer_grid_quantizer()(spec, torch.float32).rtn(W)
    assert torch.allclose(p[0].scale, torch.tensor([[1 / 3.5]]))
    # step 1/3.5 instead of 1/3; weights beyond 3 steps clip to +-3/3.5 (-1 itself is a tie at -3.5)
    assert torch.allclose(Q.max(), torch.tensor(3 / 3.5)) and len(torch.unique(Q)) <= 8
    Q0, p0 = WeightQuantizer(spec, torch.float32).rtn(W)
    assert torch.allclose(p0[0].scale, torch.tensor([[1 / 3]])) and len(torch.unique(Q0)) == 7
