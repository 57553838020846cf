"""A model's bytes with its initializers written once, straight from their arrays.

Filling ResNet50's 100 MB of weights into an `onnx.ModelProto` and calling
`SerializeToString` copies them three times (`tobytes`, into the message,
into the bytes) and takes four times as long as one copy. Protocol buffers
parse a message given field by field, in any order: so the model is
serialized without its initializers, and each initializer is appended to
the graph's bytes as one more `initializer` field whose `raw_data` is the
array's own memory. `onnx.load_model_from_string` reads back the same
model.
"""

import numpy as np
import onnx
from onnx import helper

_LENGTH_DELIMITED = 2


def _key(message, field):
    number = message.DESCRIPTOR.fields_by_name[field].number
    return _varint(number << 3 | _LENGTH_DELIMITED)


def _varint(n):
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _size(pieces):
    return sum(len(p) for p in pieces)  # bytes, or 1-D uint8 arrays


def serialize(model, initializers):
    """The bytes of `model` with `initializers` added to its graph.

    Args:
        model: An `onnx.ModelProto` whose graph holds no initializers of
            these names.
        initializers: `(name, array)` pairs; numeric or boolean C-contiguous
            arrays (written as `raw_data`, as `numpy_helper` does).

    Returns:
        The serialized model.
    """
    graph = model.graph.SerializeToString()
    pieces = [graph]
    initializer, raw_data = _key(onnx.GraphProto, "initializer"), _key(onnx.TensorProto, "raw_data")
    for name, array in initializers:
        head = onnx.TensorProto(
            name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
        ).SerializeToString()
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        tensor = [head, raw_data, _varint(raw.size), raw]
        pieces += [initializer, _varint(_size(tensor)), *tensor]
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    return b"".join([rest.SerializeToString(), _key(onnx.ModelProto, "graph"),
                     _varint(_size(pieces)), *pieces])
