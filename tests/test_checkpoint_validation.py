"""Checkpoints that fail clearly: every loader checks the manifest (lowbit.json), the tensor file's
size and SHA-256 and every stored tensor's shape and dtype before it builds anything, and raises
CheckpointError (exit status 2 on the command line) naming the file, the entry, what was expected and
what was found. A corrupted checkpoint never loads as another model."""
import ast
import copy
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from _tiny import batches, tiny_llama, token_ids  # noqa: E402
from lowbit.cli import main  # noqa: E402
from lowbit.export.checkpoint import load_quantized, save_quantized  # noqa: E402
from lowbit.export.validate import (META_FILE, WEIGHTS_FILE, CheckpointError, file_sha256,  # noqa: E402
                                    manifest_digest)

FACT = str(Path(__file__).with_name("_factories.py"))
SRC = Path(__file__).parents[1] / "src" / "lowbit"
# one layer per packed layout: int groups, asymmetric (zeros), NVFP4 (scale codes + tensor scale),
# a codebook, per channel; gate_proj keeps its float weight with quantized inputs (act_only)
PLAN_WEIGHT = {"*": "int4:g32", "*.k_proj": "int3:g64:asym", "*.v_proj": "nvfp4", "*.o_proj": "nf4:g32",
               "*.down_proj": "int8:channel", "*.gate_proj": None}
PLAN_ACT = {"*.up_proj": "int8:token", "*.gate_proj": "int8:token"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real checkpoint of a tiny Llama (tied embeddings, retained int8 weights) and its loaded model."""
    from lowbit.ptq.pipeline import quantize_model
    from lowbit.ptq.retention import RetainConfig
    from lowbit.quant.plan import Plan

    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    m = tiny_llama()
    ids = token_ids(4, 16)
    res = quantize_model(m, Plan(dict(PLAN_WEIGHT), dict(PLAN_ACT)), batches(ids, 2), "rtn", progress=False,
                         retain=RetainConfig(0.02, "int8"))
    save_quantized(m, res.packed, d, kind="causal_lm", extra={"model": "tiny-llama", "scheme": "mixed"})
    model, _, _ = load_quantized(d)
    return d, fingerprint(model)


def fingerprint(model):
    """Everything that makes two loaded models the same model: tensors, module types, specs."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mods = {n: (type(m).__name__, str(getattr(m, "weight_spec", None)), str(getattr(m, "act_spec", None)),
                getattr(m, "retain", None)) for n, m in model.named_modules()}
    return state, mods


def same(a, b) -> bool:
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def copy_of(src: Path, root) -> Path:
    d = Path(root) / "c"
    shutil.copytree(src, d)
    return d


def manifest(d: Path) -> dict:
    return json.loads((d / META_FILE).read_text())


def write_manifest(d: Path, meta: dict, reseal: bool) -> None:
    """Write ``meta``; with ``reseal`` its digest is recomputed, as if a consistent tool wrote it."""
    if reseal and isinstance(meta, dict):
        meta["manifest_sha256"] = manifest_digest(meta)
    (d / META_FILE).write_text(json.dumps(meta, indent=1))


def load_outcome(d: Path, reference):
    """'error' (a CheckpointError) or 'same' (loads as the reference model); anything else fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _, _ = load_quantized(d)
    except CheckpointError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) < 2000, msg
        return "error"
    assert same(fingerprint(model), reference), "a mutated checkpoint loaded as another model"
    return "same"


def run_cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def assert_one_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lowbit {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- the two cases users hit -----------------------------------------------------------------------

def test_intact_checkpoint_loads_the_same_model_again(ckpt):
    d, ref = ckpt
    meta = manifest(d)
    assert meta["lowbit_checkpoint"] == 2 and meta["files"][WEIGHTS_FILE]["sha256"] == file_sha256(d / WEIGHTS_FILE)
    assert meta["extra"] == ["model", "scheme"] and meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert len(meta["act_only"]) == 2 and all(v.get("retain") == "int8" for v in meta["layers"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no integrity warning for a current checkpoint
        model, _, loaded = load_quantized(d)
    assert same(fingerprint(model), ref) and loaded["model"] == "tiny-llama"


def test_truncated_weights_fail_in_one_line(ckpt, tmp_path, capsys):
    d = copy_of(ckpt[0], tmp_path)
    size = (d / WEIGHTS_FILE).stat().st_size
    with open(d / WEIGHTS_FILE, "r+b") as f:
        f.truncate(size // 2)
    rc, err = run_cli(capsys, "eval", str(d))
    line = assert_one_line(err, "eval")
    assert rc == 2 and WEIGHTS_FILE in line and f"expected {size} bytes" in line and "truncated" in line


def test_unknown_format_fails_in_one_line(ckpt, tmp_path, capsys):
    d = copy_of(ckpt[0], tmp_path)
    text = (d / META_FILE).read_text()
    layer = "model.layers.0.self_attn.q_proj"
    meta = json.loads(text)
    meta["layers"][layer]["weight"] = "int99:g64"  # a hand edit: the digest is left as it was
    (d / META_FILE).write_text(json.dumps(meta, indent=1))
    rc, err = run_cli(capsys, "eval", str(d))
    line = assert_one_line(err, "eval")
    assert rc == 2 and META_FILE in line and f"layers['{layer}'].weight" in line and "'int99:g64'" in line
    assert "integer width must be 1..32 bits, got 99" in line
    with pytest.raises(CheckpointError, match="not a valid quant spec"):
        load_quantized(d)


def test_shape_edit_with_a_fresh_digest_is_caught_by_the_tensors(ckpt, tmp_path):
    """A manifest rewritten consistently (digest recomputed) but naming other shapes than the file holds."""
    d = copy_of(ckpt[0], tmp_path)
    meta = manifest(d)
    meta["layers"]["model.layers.1.mlp.up_proj"]["shape"] = [96, 32]
    write_manifest(d, meta, reseal=True)
    with pytest.raises(CheckpointError, match=r"layer 'model.layers.1.mlp.up_proj' int4:g32 of shape \[96, 32\]: "
                                              r"tensor .*codes: expected uint8 \[1536\], found uint8 \[3072\]"):
        load_quantized(d)


def test_a_hand_edit_that_describes_another_valid_model_is_caught_by_the_digest(ckpt, tmp_path):
    """Dropping an act-only layer leaves a well-formed manifest; only its digest tells."""
    d = copy_of(ckpt[0], tmp_path)
    meta = manifest(d)
    meta["act_only"].pop("model.layers.0.mlp.gate_proj")
    write_manifest(d, meta, reseal=False)
    with pytest.raises(CheckpointError, match="manifest_sha256: .* the manifest was edited after saving"):
        load_quantized(d)


def test_bad_json_and_missing_files(ckpt, tmp_path, capsys):
    d = copy_of(ckpt[0], tmp_path)
    (d / META_FILE).write_text('{"lowbit_checkpoint": 2,')
    with pytest.raises(CheckpointError, match="lowbit.json: expected JSON, found a syntax error at line 1"):
        load_quantized(d)
    (d / META_FILE).unlink()
    rc, err = run_cli(capsys, "eval", str(d))
    assert rc == 2 and "not a lowbit checkpoint" in assert_one_line(err, "eval")


def test_checkpoint_before_checksums_loads_with_a_warning(ckpt, tmp_path):
    """Version 1 (no checksums, tied names inside layers) still loads, saying what was not checked."""
    d = copy_of(ckpt[0], tmp_path)
    v1 = to_version_1(manifest(d))
    (d / META_FILE).write_text(json.dumps(v1))
    with pytest.warns(UserWarning, match="integrity of model.safetensors could not be checked"):
        model, _, meta = load_quantized(d)
    assert same(fingerprint(model), ckpt[1]) and meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    with open(d / WEIGHTS_FILE, "r+b") as f:  # still no traceback for a truncated file
        f.truncate(1000)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="does not parse"):
        load_quantized(d)


def to_version_1(meta: dict) -> dict:
    v1 = {k: v for k, v in meta.items() if k not in ("files", "tensors", "extra", "manifest_sha256", "tied")}
    v1["lowbit_checkpoint"] = 1
    v1["layers"] = {"_tied": meta["tied"], **meta["layers"]}
    return v1


def test_plan_file_errors_name_the_entry(tmp_path, capsys):
    p = tmp_path / "plan.json"
    for body, message in ((["int4"], "expected a JSON object"),
                          ({"weight": {"*": "int99:g64"}}, r"weight\['\*'\]: 'int99:g64' is not a valid quant spec"),
                          ({"layers": {"a.b": 4}}, r"layers\['a.b'\]: expected a quant spec string"),
                          ({"weight": ["int4"]}, "weight: expected an object of pattern -> spec")):
        p.write_text(json.dumps(body))
        rc, err = run_cli(capsys, "quantize", "--plan", str(p), "--quiet")
        line = assert_one_line(err, "quantize")
        assert rc == 2 and f"plan file {p}" in line
        assert re.search(message, line), line


def test_module_checkpoint_fails_clearly(tmp_path, capsys):
    """`lowbit quantize --model-factory` checkpoints go through the same checks."""
    from lowbit.export.module_checkpoint import load_quantized_into

    out = tmp_path / "cnn"
    assert main(["quantize", "--model-factory", f"{FACT}:tiny_cnn", "--scheme", "w4", "--method", "rtn",
                 "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    meta = manifest(out)
    assert meta["kind"] == "module" and meta["extra"] and "model_factory" in meta["extra"]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    meta["layers"]["0"]["weight"] = "int4:g7x"
    (bad / META_FILE).write_text(json.dumps(meta))
    rc, err = run_cli(capsys, "eval", str(bad))
    assert rc == 2 and "layers['0'].weight: 'int4:g7x' is not a valid quant spec" in assert_one_line(err, "eval")
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    data = bytearray((bad / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0x40  # the last byte of the last tensor's data: only the checksum sees it
    (bad / WEIGHTS_FILE).write_bytes(bytes(data))
    rc, err = run_cli(capsys, "eval", str(bad))
    assert rc == 2 and "modified after saving" in assert_one_line(err, "eval")
    from _factories import tiny_cnn

    with pytest.raises(CheckpointError, match="SHA-256"):
        load_quantized_into(tiny_cnn(), bad)


# --- the packed layout a loader expects is the one pack_weight writes --------------------------------

@pytest.mark.parametrize("spec", ["int4:g32", "int3:g64:asym", "int5:g48:asym", "int8:channel", "int2:tensor",
                                  "nf4:g32", "nvfp4", "mxfp4", "e4m3fn:g32", "e2m1fn:channel"])
@pytest.mark.parametrize("shape", [(7, 96), (16, 64)])
def test_dense_layout_is_what_pack_weight_writes(spec, shape):
    from lowbit.quant.packed import dense_layout, pack_weight
    from lowbit.quant.spec import QuantSpec
    from lowbit.quant.weight import WeightQuantizer

    q = WeightQuantizer(QuantSpec.parse(spec))
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    Q, params = q.rtn(W)
    packed = pack_weight(Q, q, params)
    layout = dense_layout(QuantSpec.parse(spec), shape)
    assert set(packed) == set(layout)
    for k, t in packed.items():
        assert tuple(t.shape) == layout[k][0] and t.dtype in layout[k][1], k


# --- fuzzing: every corruption is a CheckpointError, never another model -----------------------------

WRONG = [0, -1, 1.5, True, "", "int99:g64", "foo:bar", [], {}, [7], {"x": 1}]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


@st.composite
def manifest_mutation(draw, meta: dict, reseal: bool):
    """(mutated manifest, operation, path): a deleted key, a value of a wrong type, an unknown format, a
    shape that disagrees, or an unknown key. Resealed manifests stay away from edits that describe
    another valid model (dropping an act-only layer, an input spec set to null): those are no
    corruption a reader could see once the digest is recomputed."""
    meta = copy.deepcopy(meta)
    paths = [p for p in _paths(meta) if p]
    shapes = [p for p in paths if p[-1] == "shape"]
    specs = [p for p in paths if p[-1] in ("weight", "act", "retain") or (len(p) == 2 and p[0] == "act_only")]
    op = draw(st.sampled_from(["delete", "wrong_type", "unknown_format", "shape", "unknown_key"]))
    if op == "delete":
        choices = [p for p in paths if not (reseal and p[0] == "act_only" and len(p) == 2)]
        path = draw(st.sampled_from(choices))
        parent = _get(meta, path[:-1])
        del parent[path[-1]]
    elif op == "wrong_type":
        path = draw(st.sampled_from(paths))
        old = _get(meta, path)
        new = draw(st.sampled_from([w for w in WRONG if (w != old or type(w) is not type(old))
                                    and not (reseal and path == ("act_only",) and w == {})]))
        _get(meta, path[:-1])[path[-1]] = new
    elif op == "unknown_format":
        path = draw(st.sampled_from(specs))
        new = draw(st.sampled_from(["int99:g64", "int4:g64:bogus", "mxfp4:g7", "nosuchformat", "int4:g0"]))
        _get(meta, path[:-1])[path[-1]] = new
    elif op == "shape":
        path = draw(st.sampled_from(shapes))
        shape = list(_get(meta, path))
        how = draw(st.sampled_from(["grow", "shrink", "add_dim", "drop_dim", "swap"]))
        i = draw(st.integers(0, max(len(shape) - 1, 0)))
        if how == "grow" and shape:
            shape[i] += draw(st.integers(1, 64))
        elif how == "shrink" and shape and shape[i] > 1:
            shape[i] -= draw(st.integers(1, shape[i] - 1))
        elif how == "add_dim":
            shape.append(draw(st.integers(1, 3)))
        elif how == "drop_dim" and shape:
            shape.pop(i)
        elif how == "swap" and len(shape) == 2 and shape[0] != shape[1]:
            shape.reverse()
        else:
            shape = shape + [2]
        _get(meta, path[:-1])[path[-1]] = shape
    else:
        dicts = [p for p in [()] + paths if isinstance(_get(meta, p), dict)]
        path = draw(st.sampled_from(dicts))
        _get(meta, path)[draw(st.sampled_from(["zzz", "_note", "weights"]))] = 1
    return meta, op, path


FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("reseal", [False, True], ids=["hand-edited", "digest-recomputed"])
def test_fuzz_manifest(ckpt, reseal):
    src, ref = ckpt
    original = manifest(src)

    @FUZZ
    @given(st.data())
    def run(data):
        meta, op, path = data.draw(manifest_mutation(original, reseal))
        if meta == original:
            return
        with tempfile.TemporaryDirectory() as tmp:
            d = copy_of(src, tmp)
            write_manifest(d, meta, reseal and path != ("manifest_sha256",))
            out = load_outcome(d, ref)
            # by hand, the digest covers every change; recomputed, every change but the values of the
            # caller's extra keys (a model's name says nothing a loader builds from) and the digest itself
            if not (reseal and path and (path[0] in original["extra"] or path[0] == "manifest_sha256")):
                assert out == "error", (op, path)

    run()


@st.composite
def file_mutation(draw, size: int, header_end: int, resealed: bool):
    """(kind, argument): truncation at a random length or byte flips (anywhere, or in the header when
    the file's checksum is recomputed: a flip in the data of a resealed file is a different valid file)."""
    if draw(st.booleans()):
        return "truncate", draw(st.integers(0, size - 1))
    hi = header_end if resealed else size
    flips = draw(st.lists(st.tuples(st.integers(0, hi - 1), st.integers(1, 255)), min_size=1, max_size=4))
    return "flip", flips


@pytest.mark.parametrize("mode", ["as-saved", "checksum-recomputed", "version-1"])
def test_fuzz_weights_file(ckpt, mode):
    src, ref = ckpt
    data = (src / WEIGHTS_FILE).read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    original = manifest(src)

    @FUZZ
    @given(file_mutation(len(data), header_end, resealed=mode != "as-saved"))
    def run(mutation):
        kind, arg = mutation
        if kind == "truncate":
            new = data[:arg]
        else:
            b = bytearray(data)
            for pos, x in arg:
                b[pos] ^= x
            new = bytes(b)
        if new == data:
            return
        with tempfile.TemporaryDirectory() as tmp:
            d = copy_of(src, tmp)
            (d / WEIGHTS_FILE).write_bytes(new)
            if mode == "checksum-recomputed":
                meta = copy.deepcopy(original)
                meta["files"][WEIGHTS_FILE] = {"sha256": file_sha256(d / WEIGHTS_FILE), "bytes": len(new)}
                write_manifest(d, meta, reseal=True)
            elif mode == "version-1":
                write_manifest(d, to_version_1(original), reseal=False)
            out = load_outcome(d, ref)
            if mode == "as-saved" or kind == "truncate":
                assert out == "error", mutation

    run()


# --- layering -----------------------------------------------------------------------------------------

def _imports(path: Path):
    """(module imported, names) of every import in a source file, relative ones resolved by dots."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or ""), [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_no_import_loops_and_no_private_imports():
    """quant/ and the methods (ptq) do not import export (a higher layer); the two jobs do not import
    each other's internals: module_job imports nothing from jobs."""
    for f in [*(SRC / "quant").glob("*.py"), SRC / "ptq" / "retention.py"]:
        for mod, _ in _imports(f):
            assert "export" not in mod, f"{f.name} imports {mod}"
    for mod, _ in _imports(SRC / "module_job.py"):
        assert mod.lstrip(".") != "jobs", "module_job imports jobs"
    for f in [SRC / "jobs.py", SRC / "module_job.py", SRC / "job_common.py", SRC / "ptq" / "retention.py",
              *(SRC / "export").glob("*.py")]:
        for mod, names in _imports(f):
            private = [n for n in names if n.startswith("_") and n != "__future__"]
            assert not private, f"{f.name} imports private {private} from {mod}"
