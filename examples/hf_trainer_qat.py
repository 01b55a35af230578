"""Quantization-aware training inside the Hugging Face Trainer, with lowbit's formats and learned
scales: prepare_qat before, convert after, nothing else changes in the training code.

    python3 examples/hf_trainer_qat.py                    # SmolLM2-135M, int4 g64, 20 steps on the CPU
    python3 examples/hf_trainer_qat.py MODEL_DIR --scheme nvfp4 --steps 200 --out out/m

The scales (LSQ step sizes) get their own learning rate through the optimizer passed to the
Trainer; the result is the packed checkpoint `lowbit quantize` writes (`lowbit eval OUT` reads it).
"""
from __future__ import annotations

import argparse

import torch

import lowbit
from lowbit.data.train_corpus import training_batches
from lowbit.models.loader import load_model
from lowbit.train import trainable_groups


class CorpusWindows(torch.utils.data.Dataset):
    """lowbit's stdlib training corpus as a map-style dataset of next-token examples."""

    def __init__(self, tokenizer, seq_len: int, n: int):
        self.source = training_batches(tokenizer, seq_len, 1)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        ids = self.source.batch(i)[0]
        return {"input_ids": ids, "labels": ids.clone()}


def main(model: str = "smollm2", scheme: str = "w4g64", steps: int = 20, seq_len: int = 128, batch_size: int = 4,
         lr: float = 1e-5, scale_lr: float = 1e-4, out: str | None = None) -> dict:
    from transformers import Trainer, TrainingArguments

    loaded = load_model(model)
    net, tok = loaded.model, loaded.tokenizer
    before = lowbit.evaluate(net, tok, eval_tokens=2048)["perplexity"]
    lowbit.prepare_qat(net, scheme)                     # nn.Linear -> QATLinear (fp32 master weights + quantizer)
    groups = trainable_groups(net)                      # weights and scales, for two learning rates
    opt = torch.optim.AdamW([{"params": groups["weights"], "lr": lr},
                             {"params": groups["scales"], "lr": scale_lr, "weight_decay": 0.0}])
    args = TrainingArguments(output_dir=out or "out/hf-trainer-qat", max_steps=steps,
                             per_device_train_batch_size=batch_size, report_to=[], save_strategy="no",
                             logging_steps=max(1, steps // 5), use_cpu=not torch.cuda.is_available(),
                             lr_scheduler_type="constant", disable_tqdm=True)
    trainer = Trainer(model=net, args=args, train_dataset=CorpusWindows(tok, seq_len, steps * batch_size),
                      optimizers=(opt, None))
    trainer.train()
    lowbit.convert(net)                                 # QATLinear -> QuantLinear + packed codes
    if out:   # saving rounds the unquantized tensors (embeddings, norms) to 16 bits, in place as stored
        lowbit.save(net, out, tokenizer=tok, source=model)
    after = lowbit.evaluate(net, tok, eval_tokens=2048)["perplexity"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{scheme}: perplexity fp32 {before:.3f} -> QAT {after:.3f} after {steps} steps; logged losses {losses}")
    return {"before": before, "after": after, "losses": losses}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--scheme", default="w4g64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out")
    a = ap.parse_args()
    main(a.model, a.scheme, a.steps, a.seq_len, a.batch_size, out=a.out)
