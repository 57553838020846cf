"""The one definition of a normalization layer, and the one walk over a model.

A normalization layer is a batch-normalization layer of the model's flavour
(`BatchNormalization`, any subclass of it, bnconvert's synchronized layer,
tf-keras's deprecated experimental `SyncBatchNormalization`) or a layer
whose exact class a rule names. The converter, the folder, `inspect` and
the report all ask `is_normalization`; paths are layer names from the
model down, joined by `/`, everywhere.
"""


def join(parent, name):
    """The path of layer `name` under the layer path `parent`."""
    return f"{parent}/{name}" if parent else name


def short_name(variable):
    """A variable's name without its scope and `:0` suffix."""
    return variable.name.split("/")[-1].split(":")[0]


def named_classes(rules):
    """Every class a rule matches or targets."""
    named = set()
    for rule in rules:
        named.update(rule.match_classes)
        named.add(rule.target_class)
    return frozenset(named)


def is_normalization(layer, flavour, named=frozenset()):
    """Whether `layer` is a normalization layer (see the module docstring)."""
    return isinstance(layer, flavour.bn_classes) or type(layer) in named


def is_plain_bn(layer, flavour):
    """Whether `layer` is exactly the flavour's `BatchNormalization` (foldable maths)."""
    return type(layer) is flavour.BatchNormalization


def iter_layers(model, flavour):
    """Yields `(path, layer)` for every layer below `model`, each once, InputLayers aside."""
    for path, _, layer in iter_positions(model, flavour):
        yield path, layer


def iter_positions(model, flavour):
    """Yields `(path, position, layer)` for every layer below `model`, parents first.

    `position` locates a layer by the indices of the sublayers leading to it
    (`"2.0"`: the first sublayer of the model's third). Unlike a name path
    it survives a save and reload that gives automatic names afresh (a
    custom layer creating its sublayers in `__init__`).
    """
    seen = set()

    def walk(layer, path, position):
        for index, child in enumerate(flavour.sublayers(layer)):
            if id(child) in seen or isinstance(child, flavour.InputLayer):
                continue
            seen.add(id(child))
            here = join(path, child.name)
            at = f"{position}.{index}" if position else str(index)
            yield here, at, child
            yield from walk(child, here, at)

    yield from walk(model, model.name, "")


def normalization_layers(model, flavour, named=frozenset()):
    """Yields `(path, layer)` for every normalization layer below `model`."""
    for path, layer in iter_layers(model, flavour):
        if is_normalization(layer, flavour, named):
            yield path, layer
