"""Resume of the layer-by-layer path (CNNs, MLPs): an interrupted run continues after the last
finished layer and ends with the same quantized weights and results as an uninterrupted run."""
import copy
from dataclasses import asdict

import pytest
import torch
from torch import nn

from lowbit.ptq.pipeline import quantize_model
from lowbit.quant.plan import Plan


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10),
    ).eval()


def _data(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 10, 10, generator=g) for _ in range(n)]


# layer "2" (grouped, 4 x 9 = 36 columns per group) cannot take mxfp4's blocks of 32: skipped;
# layer "10" quantizes its input only; the others int3 weights, "4" with int8 inputs too
PLAN = dict(weight={"*": "int3", "2": "mxfp4", "10": None}, act={"4": "int8:token", "10": "int8:token"})


class Stop(Exception):
    pass


def _stop_at(name):
    def cb(lr):
        if lr.name == name:
            raise Stop
    return cb


def _summary(res):
    return [{k: v for k, v in asdict(l).items() if k != "seconds"} for l in res.layers], res.skipped


def _same(res, ref, m, m_ref, x):
    assert _summary(res) == _summary(ref)
    assert list(res.packed) == list(ref.packed)
    for n in ref.packed:
        assert ref.packed[n].keys() == res.packed[n].keys()
        for k in ref.packed[n]:
            assert torch.equal(res.packed[n][k], ref.packed[n][k]), (n, k)
    for (n, p), (_, p_ref) in zip(m.state_dict().items(), m_ref.state_dict().items()):
        assert torch.equal(p, p_ref), n
    with torch.no_grad():
        assert torch.equal(m(x), m_ref(x))


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_interrupted_run_resumes_bit_for_bit(tmp_path, method):
    model, data = _cnn(), _data()
    x = torch.randn(4, 3, 10, 10)
    full = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="2 left in full precision"):
        ref = quantize_model(full, Plan(**copy.deepcopy(PLAN)), data, method, progress=False)
    assert "2" in ref.skipped and [l.name for l in ref.layers] == ["0", "4", "8"]

    m = copy.deepcopy(model)
    with pytest.raises(Stop), pytest.warns(UserWarning):
        quantize_model(m, Plan(**copy.deepcopy(PLAN)), data, method, progress=False,
                       progress_dir=tmp_path, on_layer=_stop_at("4"))
    assert (tmp_path / "progress.json").is_file()
    seen = []
    resumed = copy.deepcopy(model)
    res = quantize_model(resumed, Plan(**copy.deepcopy(PLAN)), data, method, progress=False,
                         progress_dir=tmp_path, on_layer=lambda lr: seen.append(lr.name))
    assert seen == ["8"]  # only what was left; "0" and "4" came back from the folder
    assert type(resumed[10]).__name__ == "QuantLinear" and resumed[10].act_spec is not None
    _same(res, ref, resumed, full, x)


def test_progress_of_another_run_is_not_used(tmp_path):
    model, data = _cnn(), _data()
    m = copy.deepcopy(model)
    with pytest.raises(Stop):
        quantize_model(m, Plan({"*": "int4"}), data, "gptq", progress=False, progress_dir=tmp_path,
                       on_layer=_stop_at("8"))
    # another plan, other calibration data, another model's weights, another method: each starts over
    for plan, batches, mdl, method, what in [
            (Plan({"*": "int3"}), data, model, "gptq", "plan"),
            (Plan({"*": "int4"}), _data(seed=5), model, "gptq", "data"),
            (Plan({"*": "int4"}), data, _cnn(seed=3), "gptq", "model"),
            (Plan({"*": "int4"}), data, model, "rtn", "method")]:
        seen = []
        m = copy.deepcopy(mdl)
        with pytest.warns(UserWarning, match=f"another run .*{what}"):
            res = quantize_model(m, plan, batches, method, progress=False, progress_dir=tmp_path,
                                 on_layer=lambda lr: seen.append(lr.name))
        assert seen == ["0", "2", "4", "8", "10"]
        fresh = copy.deepcopy(mdl)
        ref = quantize_model(fresh, plan, batches, method, progress=False)
        _same(res, ref, m, fresh, data[0])
        # leave the first run's progress in place for the next case
        m = copy.deepcopy(model)
        with pytest.raises(Stop), pytest.warns(UserWarning, match="another run"):
            quantize_model(m, Plan({"*": "int4"}), data, "gptq", progress=False, progress_dir=tmp_path,
                           on_layer=_stop_at("8"))
