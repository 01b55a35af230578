"""`lowbit search` sensitivities with the model on a GPU: the calibration batches follow the model and
the estimators give the CPU's values (same probes, summation order aside)."""
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.filterwarnings("ignore:.*Hessian trace estimates are negative"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def tiny():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def _table(model, batches, tmp_path, tag):
    from lowbit.search.candidates import layer_candidates, parse_candidates, quantizable_layers
    from lowbit.search.cost import CostModel, cost_matrix
    from lowbit.search.objective import Objective
    from lowbit.search.sensitivity import SensitivitySettings, compute

    layers = quantizable_layers(model)
    cands = layer_candidates(layers, parse_candidates("int2:g64,int4:g64,int8:g128"))
    costs = cost_matrix(cands, CostModel("bits"))
    obj = Objective(model, "causal_lm", batches)
    return compute(obj, layers, cands, costs, ("hutchinson", "fisher", "measured"), True,
                   SensitivitySettings(hutchinson_samples=2, top_layers=3), tmp_path / f"{tag}.json",
                   progress=False)


def test_make_batches_follow_the_model(monkeypatch):
    import lowbit.data.corpus as corpus
    from lowbit.search.objective import make_batches

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(corpus, "calibration_batches", lambda tok, n, L, seed=0: ids[:n, :L])
    loaded = SimpleNamespace(kind="causal_lm", tokenizer=None, model=tiny().cuda())
    batches = make_batches(loaded, 4, 16, batch_size=2)
    assert len(batches) == 2 and all(b["input_ids"].is_cuda for b in batches)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]).cpu(), ids)


def test_estimators_on_cuda_match_the_cpu(tmp_path):
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    cpu_b = [{"input_ids": ids[i:i + 2]} for i in (0, 2)]
    gpu_b = [{k: v.cuda() for k, v in b.items()} for b in cpu_b]
    ref = _table(tiny(), cpu_b, tmp_path, "cpu")
    got = _table(tiny().cuda(), gpu_b, tmp_path, "gpu")
    assert got.layers == ref.layers
    for est in ("measured", "fisher", "hutchinson"):
        a = torch.tensor([ref.values[est][n][s] for n in ref.layers for s in ref.values[est][n]])
        b = torch.tensor([got.values[est][n][s] for n in got.layers for s in got.values[est][n]])
        # same probes and weights; only summation order differs (loose for the noisy 2-probe trace)
        tol = 0.05 if est == "hutchinson" else 0.02
        assert (a - b).abs().max() <= tol * a.abs().max() + 1e-7, (est, (a - b).abs().max(), a.abs().max())
    assert len(got.pairs) == len(ref.pairs)
