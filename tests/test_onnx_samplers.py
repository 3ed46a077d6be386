"""The GridSample rewrite of the exported samplers (inference/onnx_samplers.py).

A small ONNX graph is built here in the gather form the export produces
(:func:`inference.layers.sampling._trilinear_padded`: zero padding, a clamp onto the padded grid,
eight gathers at corner offsets, weights, a sum); the rewrite must find it, replace it by one
GridSample and give the same values (and those of scipy's trilinear interpolation with zero
padding) at points inside, on the border of and outside the grid.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from inference import onnx_samplers  # noqa: E402

SHAPE_ZYX = (5, 6, 7)


def gather_form_model(channels: int, points: int, *, shift_as_constant: bool = True,
                      offsets=None) -> "onnx.ModelProto":
    """volume (1, Z, Y, X, C), coords (1, P, 3) -> values (1, P, C) by eight gathers.

    ``shift_as_constant=False`` adds the shift into the padded grid from a graph input (as
    tf2onnx leaves it when it has folded the +1 into other arithmetic)."""
    depth, rows, cols = (n + 3 for n in SHAPE_ZYX)
    offsets = offsets or [(cz * rows + cy) * cols + cx for cz in (0, 1) for cy in (0, 1) for cx in (0, 1)]
    inits = {
        "pads": np.array([0, 1, 1, 1, 0, 0, 2, 2, 2, 0], np.int64),
        "flat_shape": np.array([depth * rows * cols, channels], np.int64),
        "one": np.array(1.0, np.float32),
        "upper": np.array([depth - 2, rows - 2, cols - 2], np.float32),
        "lower": np.zeros(3, np.float32),
        "rows": np.array(rows, np.int64), "cols": np.array(cols, np.int64),
        "axis_last": np.array([2], np.int64),
        **{f"start{a}": np.array([a], np.int64) for a in range(3)},
        **{f"end{a}": np.array([a + 1], np.int64) for a in range(3)},
        **{f"offset{k}": np.array(o, np.int64) for k, o in enumerate(offsets)},
    }
    n = helper.make_node
    nodes = [n("Pad", ["volume", "pads"], ["padded"]), n("Reshape", ["padded", "flat_shape"], ["flat"])]
    if shift_as_constant:
        nodes.append(n("Add", ["coords", "one"], ["shifted"]))
    else:
        nodes.append(n("Add", ["coords", "shift"], ["shifted"]))
    nodes += [n("Min", ["shifted", "upper"], ["clamped_hi"]), n("Max", ["clamped_hi", "lower"], ["clamped"]),
              n("Floor", ["clamped"], ["base_f"]), n("Sub", ["clamped", "base_f"], ["frac"]),
              n("Cast", ["base_f"], ["base"], to=TensorProto.INT64)]
    for a, name in enumerate("zyx"):
        nodes += [n("Slice", ["base", f"start{a}", f"end{a}", "axis_last"], [f"b{name}3"]),
                  n("Squeeze", [f"b{name}3", "axis_last"], [f"b{name}"]),
                  n("Slice", ["frac", f"start{a}", f"end{a}", "axis_last"], [f"f{name}"]),
                  n("Sub", ["one", f"f{name}"], [f"g{name}"])]
    nodes += [n("Mul", ["bz", "rows"], ["i0"]), n("Add", ["i0", "by"], ["i1"]), n("Mul", ["i1", "cols"], ["i2"]),
              n("Add", ["i2", "bx"], ["index"])]
    total = None
    k = 0
    for cz in "gf":
        for cy in "gf":
            for cx in "gf":
                nodes += [n("Add", ["index", f"offset{k}"], [f"idx{k}"]),
                          n("Gather", ["flat", f"idx{k}"], [f"v{k}"]),
                          n("Mul", [f"{cz}z", f"{cy}y"], [f"wzy{k}"]), n("Mul", [f"wzy{k}", f"{cx}x"], [f"w{k}"]),
                          n("Mul", [f"v{k}", f"w{k}"], [f"t{k}"])]
                if total is not None:
                    nodes.append(n("Add", [total, f"t{k}"], [f"s{k}"]))
                total = f"s{k}" if total is not None else f"t{k}"
                k += 1
    nodes.append(n("Identity", [total], ["values"]))
    inputs = [helper.make_tensor_value_info("volume", TensorProto.FLOAT, [1, *SHAPE_ZYX, channels]),
              helper.make_tensor_value_info("coords", TensorProto.FLOAT, [1, points, 3])]
    if not shift_as_constant:
        inputs.append(helper.make_tensor_value_info("shift", TensorProto.FLOAT, [3]))
    graph = helper.make_graph(nodes, "gather_sampler", inputs,
                              [helper.make_tensor_value_info("values", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, feed):
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["values"], feed)[0]


def sample_points(rng, count):
    """Points inside, on the faces of, just outside and far outside the grid; some on voxel centres."""
    high = np.array(SHAPE_ZYX, np.float32) - 1
    inside = rng.uniform(0, 1, size=(count, 3)).astype(np.float32) * high
    near = rng.uniform(-1.5, 1.5, size=(count // 4, 3)).astype(np.float32) + rng.integers(0, 2, (count // 4, 3)) * high
    far = rng.uniform(-20, 20, size=(8, 3)).astype(np.float32)
    centres = rng.integers(0, 5, size=(8, 3)).astype(np.float32)
    return np.concatenate([inside, near, far, centres, np.zeros((1, 3)), high[None]]).astype(np.float32)[None]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shift_as_constant", [True, False])
def test_gather_sampler_becomes_one_gridsample_with_the_same_values(channels, shift_as_constant):
    from scipy import ndimage

    rng = np.random.default_rng(4)
    coords = sample_points(rng, 200)
    volume = rng.normal(size=(1, *SHAPE_ZYX, channels)).astype(np.float32)
    model = gather_form_model(channels, coords.shape[1], shift_as_constant=shift_as_constant)
    feed = {"volume": volume, "coords": coords}
    if not shift_as_constant:
        feed["shift"] = np.ones(3, np.float32)
    found = onnx_samplers.find_samplers(model)
    assert len(found) == 1 and found[0]["dims"] == tuple(n + 3 for n in SHAPE_ZYX)
    assert found[0]["shift"] == (1.0 if shift_as_constant else 0.0)

    rewritten, count = onnx_samplers.rewrite_samplers(model)
    ops = [node.op_type for node in rewritten.graph.node]
    assert count == 1 and ops.count("GridSample") == 1 and "Gather" not in ops and "Floor" not in ops
    assert next(o.version for o in rewritten.opset_import if o.domain in ("", "ai.onnx")) == 20

    expected, actual = run(model, feed), run(rewritten, feed)
    assert actual.shape == expected.shape == (1, coords.shape[1], channels)
    np.testing.assert_allclose(actual, expected, atol=2e-5)
    reference = np.stack([ndimage.map_coordinates(volume[0, ..., c], coords[0].T, order=1, mode="grid-constant",
                                                  cval=0.0, prefilter=False) for c in range(channels)], -1)
    np.testing.assert_allclose(actual[0], reference, atol=2e-5)
    assert np.abs(reference).max() > 0.5 and (reference == 0).any()  # values and zero padding both seen


def test_other_gathers_are_left_alone():
    # corner offsets of another grid (a wrong row length): not the sampler pattern, nothing rewritten
    depth, rows, cols = (n + 3 for n in SHAPE_ZYX)
    wrong = [(cz * rows + cy) * (cols + 1) + cx for cz in (0, 1) for cy in (0, 1) for cx in (0, 1)]
    model = gather_form_model(1, 10, offsets=wrong)
    assert onnx_samplers.find_samplers(model) == []
    same, count = onnx_samplers.rewrite_samplers(model)
    assert count == 0 and same is model


def test_widened_axis_broadcasts_give_the_same_bits():
    rng = np.random.default_rng(5)
    limits = np.array([0.5, -0.25, 2.0], np.float32)
    nodes = [helper.make_node("Min", ["x", "limits"], ["low"]),
             helper.make_node("Sub", ["limits", "low"], ["flipped"]),  # constant first: order kept
             helper.make_node("Div", ["flipped", "limits"], ["values"])]
    graph = helper.make_graph(nodes, "broadcasts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 48, 3])],
                              [helper.make_tensor_value_info("values", TensorProto.FLOAT, [2, 4, 48, 3])],
                              [numpy_helper.from_array(limits, "limits")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    wide = onnx.ModelProto.FromString(model.SerializeToString())
    assert onnx_samplers.widen_axis_broadcasts(wide) == 3
    onnx_samplers._toposort(wide)
    onnx.checker.check_model(wide)
    x = rng.normal(size=(2, 4, 48, 3)).astype(np.float32)
    expected = np.asarray((limits - np.minimum(x, limits)) / limits, np.float32)
    np.testing.assert_array_equal(run(wide, {"x": x}), run(model, {"x": x}))
    np.testing.assert_array_equal(run(wide, {"x": x}), expected)
    # 4 * 48 = 192 points: 64 per row of the widened form (gcd with 1024)
    rows = [numpy_helper.to_array(i) for i in wide.graph.initializer if i.name.endswith("/rows")]
    assert rows and all(list(r) == [-1, 64 * 3] for r in rows)


def test_rewrite_only_refuses_a_model_without_gather_samplers(tmp_path, capsys):
    # the shipped export is already rewritten: the CLI says so in one line and exits 2, file untouched
    import shutil

    from inference.checksums import sha256_file
    from inference.cli import EXIT_BAD_INPUT, run as cli_run
    from inference.resources import default_model_file

    shipped = default_model_file().parent
    shutil.copytree(shipped, tmp_path / "model")
    onnx_file = tmp_path / "model" / "hipatlas-compact.onnx"
    before = sha256_file(onnx_file)
    assert cli_run(["export-onnx", str(onnx_file), "--rewrite-only"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no gather-form trilinear samplers" in err[0]
    assert sha256_file(onnx_file) == before
