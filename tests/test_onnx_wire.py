"""The native exporter's bytes: initializers appended to the serialized graph (`onnx.wire`).

The reference is the protobuf library's own serialization of the same
model with the initializers filled in as `numpy_helper` would.
"""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnx import numpy_helper

from bnconvert.onnx import wire


def _model():
    nodes = [helper.make_node("Add", ["x", "w"], ["y"]),
             helper.make_node("Cast", ["flag"], ["flag_f"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Mul", ["y", "flag_f"], ["out"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 2])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["batch", 3, 2])],
    )
    opsets = [helper.make_opsetid("", 17)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="test",
                             ir_version=helper.find_min_ir_version_for(opsets))


def _arrays():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((2, 3, 300, 200)).astype(np.float32)
    return [
        ("w", rng.standard_normal((2, 3)).astype(np.float32).T),  # not C-contiguous
        ("flag", np.array([[True], [False], [True]]).reshape(3, 1)),
        ("scalar", np.float32(-2.5).reshape(())),
        ("ints", np.array([-1, 2**40, 0], np.int64)),
        ("half", np.array([1.5, -65504.0, 6e-8], np.float16)),
        ("empty", np.zeros((0, 4), np.float32)),
        ("big", big[:, :, ::-1]),  # large, strided
    ]


def test_wire_bytes_parse_to_the_libraries_own_model():
    model, arrays = _model(), _arrays()
    data = wire.serialize(model, arrays)
    reference = _model()
    reference.graph.initializer.extend(numpy_helper.from_array(np.array(a), n) for n, a in arrays)
    parsed = onnx.load_model_from_string(data)
    assert parsed == reference
    assert len(data) == len(reference.SerializeToString())
    for tensor, (name, array) in zip(parsed.graph.initializer, arrays):
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), array)
        assert tensor.name == name


def test_onnxruntime_runs_the_wire_bytes():
    model = _model()
    w = np.array([[1.0, -2.0], [3.0, 4.5], [-0.5, 0.0]], np.float32)
    flag = np.array([[True], [False], [True]])
    data = wire.serialize(model, [("w", w), ("flag", flag)])
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.arange(12, dtype=np.float32).reshape(2, 3, 2) - 5
    got = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, (x + w) * flag.astype(np.float32))
