"""Every private Keras, tf-keras and TensorFlow name that bnconvert touches.

Keras exports no public way to do a few things a graph rewriter needs: list
a plain layer's direct sublayers, swap one of them in Keras's own tracking
list, read the graph nodes of a Functional model, or find the layer that
produced a symbolic tensor. Those accesses live in this package and nowhere else, each
behind a small function, and `tests/test_keras_internals.py` pins every one:
an upgrade that removes one fails that test with the name of what moved.

Accesses that a safety check depends on (tf-keras's `SafeModeScope` and
`RevivedLayer`) fail closed: if they cannot be imported, `InternalsError`
is raised and the caller refuses to load the model, rather than loading it
without the check.
"""

# One namespace for callers; the submodules only split it by subject.
from bnconvert.keras_internals._errors import InternalsError  # noqa: F401
from bnconvert.keras_internals.graph import (  # noqa: F401
    become,
    GraphNode,
    graph_nodes,
    producer_of,
    producing_node,
    producing_layer,
    is_consumed,
)
from bnconvert.keras_internals.keras3 import (  # noqa: F401
    keras3_functional_class,
    direct_sublayers,
    replace_tracked_sublayer,
    TRACKING_ATTRIBUTES,
    keras3_safe_mode_scope,
    has_symbolic_inputs,
    call_context_args,
    inference_call_context,
    shadow_method,
    unshadow_method,
    backend_calls_through_ops,
    none_outputs_dropped,
    keras3_deferred_initializers,
    keras3_saving_skipsets,
)
from bnconvert.keras_internals.tf_and_tf_keras import (  # noqa: F401
    freeze_concrete_function,
    inline_functions,
    tf_keras_functional_class,
    tf_keras_safe_mode_scope,
    tf_keras_revived_layer_class,
    tf_keras_saved_metadata,
)
