"""`lowbit formats`: the table of known formats, the detail of one, and clear errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

import lowbit
from lowbit.cli import main
from lowbit.formats import BlockFormat, known_names


def run(capsys, *argv):
    rc = main(["formats", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _field(out: str, key: str) -> str:
    for line in out.splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip() == key:
            return v.strip()
    raise AssertionError(f"no {key!r} line in:\n{out}")


def test_table_lists_every_known_name_with_its_properties(capsys):
    rc, out, err = run(capsys)
    assert rc == 0 and not err
    first = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for n in known_names():
        assert n in first, f"{n} missing from the table"
        f = lowbit.format(n)
        row = first[n]
        if isinstance(f, BlockFormat):
            assert row[1] == str(f.element) and row[2] == str(f.scale) and row[3] == str(f.size)
        else:
            assert f"{f.max:.6g}" == row[4], (n, row)
            assert row[1] == (str(f) if str(f) != n else "-")  # aliases show their canonical name
    assert first["e4m3"][1:5] == ["-", "float", "8", "240"]
    assert first["e4m3fn"][2:5] == ["float/fn", "8", "448"]
    assert first["bf16"][1] == "e8m7" and first["e8m0"][1:3] == ["e8m0fnu", "float/fnu"]
    assert first["int4n"][2] == "int/narrow" and first["nf4"][2] == "codebook"
    assert "Also accepted" in out


def test_detail_e4m3_shows_max_240_and_its_values(capsys):
    rc, out, err = run(capsys, "e4m3")
    assert rc == 0 and not err
    assert _field(out, "name") == "e4m3"
    assert _field(out, "max") == "240" and _field(out, "min") == "-240"
    assert _field(out, "min_subnormal") == "0.001953125" and _field(out, "epsilon") == "0.125"
    assert _field(out, "inf") == "yes" and _field(out, "bias") == "7"
    vals = _field(out, "values")
    assert vals.startswith("239 finite values: -240, -224,") and "240  (--all" in vals
    rc, out, _ = run(capsys, "e4m3", "--all")
    listed = [float(v) for v in _field(out, "values").split(":", 1)[1].split(",")]
    assert listed == lowbit.format("e4m3").values().tolist()
    assert max(listed) == 240.0 and len(listed) == 239


def test_detail_small_formats_list_every_value_and_aliases_name_their_source(capsys):
    rc, out, _ = run(capsys, "fp4_e2m1")
    assert rc == 0 and _field(out, "name") == "e2m1fn  (from 'fp4_e2m1')"
    assert _field(out, "values") == "15 finite values: -6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6"
    assert _field(out, "nan") == "no" and _field(out, "inf") == "no"
    rc, out, _ = run(capsys, "int4n")
    assert _field(out, "values").endswith("-7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7")


def test_detail_block_format(capsys):
    rc, out, _ = run(capsys, "nvfp4")
    assert rc == 0
    assert (_field(out, "element"), _field(out, "scale"), _field(out, "block")) == ("e2m1fn", "e4m3fn", "16")
    assert _field(out, "tensor_scale") == "yes" and _field(out, "bits") == "4.5"
    assert _field(out, "element values").startswith("15 finite values: -6,")
    rc, out, _ = run(capsys, "mxfp4")
    assert _field(out, "scale") == "e8m0fnu" and _field(out, "block") == "32"


def test_wide_formats_say_why_values_are_not_listed(capsys):
    rc, out, _ = run(capsys, "fp32")
    assert rc == 0 and "2**32 codes" in _field(out, "values")


def test_unknown_name_exits_2_with_a_clear_message_on_stderr():
    p = subprocess.run([sys.executable, "-m", "lowbit.cli", "formats", "nosuch"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.startswith("lowbit formats: error: unknown format 'nosuch'")
    assert "Accepted:" in p.stderr and "eXmY" in p.stderr and "mxfp4" in p.stderr


@pytest.mark.parametrize("name,needle", [("e9m30", "exponent bits must be 1..8"), ("e0m0", "exponent bits"),
                                         ("int0", "integer width"), ("block(e2m1,e8m0,0)", "block size")])
def test_impossible_formats_exit_2(capsys, name, needle):
    rc, out, err = run(capsys, name)
    assert rc == 2 and out == ""
    assert err.startswith("lowbit formats: error:") and needle in err
