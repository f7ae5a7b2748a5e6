"""Directions, files, geometry, labels and the numpy boundary (fast: no generation)."""

import numpy as np
import pytest
import persona_gate as pg


def test_random_directions_files_and_geometry(q05_f32, tmp_path):
    a = pg.directions.random(q05_f32, seed=7)
    assert a.vectors.shape == (24, q05_f32.d_model) and a.vectors.dtype == np.float32
    np.testing.assert_allclose(a.norms(), 1.0, rtol=1e-5)
    b = pg.directions.random(q05_f32, seed=7)
    assert np.array_equal(a.vectors, b.vectors)
    c = pg.directions.random(like=3.0 * a, orthogonal_to=a, seed=8)
    assert np.abs(c.cosines(a)).max() < 1e-4
    np.testing.assert_allclose(c.norms(), 3.0, rtol=1e-4)
    a.save(tmp_path / "a.safetensors")
    back = pg.directions.load(tmp_path / "a.safetensors")
    assert np.array_equal(back.vectors, a.vectors) and back.meta["seed"] == 7
    geo = pg.directions.geometry(a, c)
    assert abs(geo.cosines(a.name, c.name)).max() < 1e-4 if a.name != c.name else True
    assert "random" in str(geo).lower() or len(str(geo)) > 0
    # llama.cpp control vector round trip.
    a.export_gguf(tmp_path / "a.gguf", coeff=2.0, unit=True)
    cv = pg.directions.load(tmp_path / "a.gguf", n_layers=24)
    present = np.abs(cv.vectors).sum(1) > 0
    np.testing.assert_allclose(cv.vectors[present], 2.0 * a.vectors[present], rtol=1e-5, atol=1e-6)


def test_direction_values_and_torch_like_inputs(q05_f32):
    s = pg.directions.random(q05_f32, seed=1)
    d = s.at(5)
    assert d.layer == 5 and d.label.endswith("[5]")
    mixed = 0.5 * s - s
    np.testing.assert_allclose(mixed.vectors, -0.5 * s.vectors, rtol=1e-6)

    class DL:  # anything with __array__ (a torch tensor on the CPU) is accepted
        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            return self.a

    plan = pg.Plan().add(DL(np.asarray(d.vector, np.float64)), 2.0, layers="3-4").ablate(s, layers=[7, 8])
    assert len(plan) == 3 and plan.ops[0]["layers"] == "3,4" and plan.ops[2]["layers"] == "8"
    plan.check(q05_f32)


def test_labels_rules():
    labels = pg.label(None, ["How do I make a bomb?", "How do I bake bread?"],
                      ["I'm sorry, but I can't help with that.",
                       "Mix flour, water, yeast and salt, knead, let it rise, then bake at 220C for 30 minutes."])
    assert [l.label for l in labels] == ["refusal", "bypass"]
    assert labels.labeler.startswith("rules@2")
    assert labels.rate("refusal") == 0.5


def test_prompt_sets_and_info(q05_f32):
    assert len(pg.directions.prompts("harmful_train", 5)) == 5
    assert q05_f32.info["n_layers"] == 24 and q05_f32.n_layers == 24
    with pytest.raises(pg.Error):
        pg.directions.prompts("no_such_set")
