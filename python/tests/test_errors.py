"""Library errors arrive as Python exceptions carrying the library's one-line messages (the same
lines `pgate` prints after `error:`)."""

import subprocess

import numpy as np
import pytest
import persona_gate as pg

from conftest import model_path, pgate_bin


def one_line(e):
    s = str(e.value)
    assert "\n" not in s and s
    return s


def test_missing_model_file(tmp_path):
    with pytest.raises(pg.Error) as e:
        pg.Model.load(str(tmp_path / "nope.gguf"))
    assert "nope.gguf" in one_line(e)


def test_not_a_model(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(pg.FileError) as e:
        pg.Model.load(str(p))
    assert "junk.gguf" in one_line(e)


def test_bad_dtype_and_device():
    with pytest.raises(pg.InvalidInput) as e:
        pg.Model.load("q05", dtype="f8")
    assert one_line(e) == "invalid value: unknown dtype 'f8' (expected f32, bf16, f16 or q)"
    with pytest.raises(pg.InvalidInput):
        pg.Model.load("q05", device="tpu")
    with pytest.raises(pg.InvalidInput) as e:
        pg.Model.load("q05", device="cpu,tpu")
    assert "unknown device 'tpu'" in one_line(e)


def test_a_model_split_over_devices_generates_the_same_tokens():
    # Two CPU "devices": the layer split's placement, plan and cache paths, as the CLI test does.
    whole = pg.Model.load("smollm2", dtype="f32")
    split = pg.Model.load("smollm2", dtype="f32", device="cpu,cpu")
    a = whole.generate(["Tell me about the sea."], max_tokens=8)
    b = split.generate(["Tell me about the sea."], max_tokens=8)
    assert a[0].tokens == b[0].tokens and a[0].text == b[0].text


def test_plan_errors_match_the_cli(q05_f32, tmp_path):
    d = q05_f32.d_model
    bad = pg.Plan().add(np.ones(d, np.float32), 2.0, layers=99)
    with pytest.raises(pg.InvalidInput) as e:
        q05_f32.generate(["Hi"], plan=bad, max_tokens=2)
    msg = one_line(e)
    assert "layer 99 is out of range: the model has 24 layers (0..=23)" in msg
    bad.save(tmp_path / "bad.json")
    cli = subprocess.run(
        [pgate_bin(), "generate", model_path("q05"), "--plan", str(tmp_path / "bad.json"), "--prompt", "Hi"],
        capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode != 0
    assert msg in cli.stderr, cli.stderr

    with pytest.raises(pg.InvalidInput) as e:
        pg.Plan().ablate(np.ones(d + 1, np.float32), layers=3).check(q05_f32)
    assert f"width {d + 1}" in one_line(e)
    with pytest.raises(pg.InvalidInput) as e:
        pg.Plan().add(np.ones(d, np.float32), float("nan"), layers=3).check(q05_f32)
    one_line(e)
    with pytest.raises(pg.InvalidInput) as e:
        pg.Plan().ablate(np.zeros(d, np.float32), layers=3).check(q05_f32)
    one_line(e)


def test_empty_and_bad_inputs(q05_f32):
    with pytest.raises(pg.InvalidInput) as e:
        q05_f32.generate([], max_tokens=2)
    assert one_line(e) == "empty input: no prompts given"
    with pytest.raises(pg.InvalidInput):
        q05_f32.capture(["Hi"], position="middle")
    with pytest.raises(IndexError):
        q05_f32.capture(["Hi"], layers=24)
    with pytest.raises(pg.InvalidInput):
        q05_f32.generate([" "], max_tokens=2)
    with pytest.raises(pg.InvalidInput):
        q05_f32.logits([[10**9]])
    with pytest.raises(pg.InvalidInput):
        pg.directions.trait(q05_f32, "no-such-trait")
    with pytest.raises(pg.InvalidInput):
        pg.label(None, ["q"], ["a"], labeler="nope")
