"""How `convert_model` copies a Keras 3 model, against the other ways to copy it (issue 18).

`convert_model` never touches the caller's model: it rewrites a copy. Three
copies keep every guarantee it needs (same classes, configs and weights;
nothing run from a file), timed here side by side in one process on the same
model, which goes first rotating round by round, medians compared:

- ours: `Keras3Flavour.fresh_copy`, the config round trip Keras's save and
  load make, without the file (serialize, deserialize, set the weights, the
  initializers' draws deferred since the weights overwrite them);
- `keras.models.clone_model` followed by `set_weights`;
- an in-memory archive: `model.save` to a `.keras` file in /tmp and
  `keras.saving.load_model` of it (what the API did first).

Usage: python benchmarks/model_copy.py [--models EfficientNetV2B0,EfficientNetV2S] [--rounds 5]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bnconvert import flavour  # noqa: E402


def ours(model, tmp):
    return flavour.get(flavour.KERAS3).fresh_copy(model, {})


def clone(model, tmp):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def archive(model, tmp):
    path = os.path.join(tmp, "copy.keras")
    model.save(path)
    return keras.saving.load_model(path, compile=False)


WAYS = {"ours (config round trip)": ours, "clone_model + set_weights": clone,
        "save + load (.keras)": archive}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="EfficientNetV2B0,EfficientNetV2S")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"Copying a model, medians of {args.rounds} rounds, order rotating; "
          "ratio against ours")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = getattr(keras.applications, name)(weights=None)
            times = {way: [] for way in WAYS}
            ways = list(WAYS.items())
            for round_ in range(args.rounds):
                for way, copy_of in ways[round_ % 3:] + ways[:round_ % 3]:
                    start = time.perf_counter()
                    copy = copy_of(model, tmp)
                    times[way].append(time.perf_counter() - start)
                    if round_ == 0:  # the copy holds the same weights, bit for bit
                        same = all(np.array_equal(a, b) for a, b in
                                   zip(model.get_weights(), copy.get_weights()))
                        if not same:
                            sys.exit(f"{way} did not copy {name}'s weights")
                    del copy
            base = statistics.median(times[ways[0][0]])
            print(f"{name} ({len(model.layers)} layers)")
            for way, values in times.items():
                median = statistics.median(values)
                print(f"  {way:28}{median:8.2f} s{median / base:8.2f}")
            keras.backend.clear_session()


if __name__ == "__main__":
    main()
