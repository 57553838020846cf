"""Benchmark P3: the cost of `to-sync`, against anchors measured in the same run.

1. ResNet50 (keras.applications, weights=None), file to file. The anchor is
   what any tool must pay to rewrite a file: load it and save it
   (`model_io.load_model` + `model_io.save_model`). `bnconvert to-sync` (run
   in-process through the click command: load, convert in place, verify,
   save, and load the written file back to check it) is reported as a ratio
   to it. Target: <= 2.0 (issue 9: the reload check is part of it).
2. Synthetic chains of Dense/BatchNormalization pairs with 100, 500 and 2,000
   layers, converted in memory (`convert_model`: a copy through Keras's
   config round trip, then the in-place rewrite; with and without
   verification): time per layer, and its ratio to the 100-layer model's.
   Target: linear, i.e. ratios near 1.

3. With `--ladder B0,S,M,L,chain`: issue 18's ladder of whole processes
   (`benchmarks/ladder.py`): `to-sync` against Keras load + save and
   `inspect` against Keras load, time and peak RSS, medians.

Each figure is the best of `--repeats` runs (the least disturbed by other
processes); the ResNet50 table also gives the medians. Run from the
repository root:

    python benchmarks/convert.py [--repeats 3] [--sizes 100,500,2000] [--no-resnet]
    python benchmarks/convert.py --ladder B0,S,M,L,chain [--repeats 3]
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import bnconvert_cli as cli  # noqa: E402
import bnconvert_cli_startup  # noqa: E402
from click.testing import CliRunner  # noqa: E402

bnconvert_cli_startup.start_tensorflow()  # quiet device start-up, as the CLI does

import bnconvert  # noqa: E402
import keras  # noqa: E402

from bnconvert import model_io  # noqa: E402


def best_of(repeats, fn):
    """Runs `fn` `repeats` times; returns (best seconds, all seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


def resnet50_file_to_file(repeats, workdir):
    source = workdir / "resnet50.keras"
    keras.applications.ResNet50(weights=None).save(source)
    anchor_out = workdir / "anchor.keras"
    keras_out = workdir / "keras_own.keras"
    sync_out = workdir / "resnet50.sync.keras"

    phases = {}

    def load_and_save():
        t0 = time.perf_counter()
        model = model_io.load_model(source)
        t1 = time.perf_counter()
        model_io.save_model(model, anchor_out, force=True)
        phases.setdefault("load", []).append(t1 - t0)
        phases.setdefault("save", []).append(time.perf_counter() - t1)

    def keras_load_and_save():
        t0 = time.perf_counter()
        model = keras.saving.load_model(source)
        t1 = time.perf_counter()
        model.save(keras_out)
        phases.setdefault("keras_load", []).append(t1 - t0)
        phases.setdefault("keras_save", []).append(time.perf_counter() - t1)

    def to_sync():
        result = CliRunner().invoke(
            cli.main, ["to-sync", str(source), "-o", str(sync_out), "--force"]
        )
        if result.exit_code != 0:
            raise SystemExit(f"to-sync failed: {result.output}")

    # One untimed round of each, so that neither pays Python's and Keras's
    # first-use costs (imports, op registration) alone.
    load_and_save()
    keras_load_and_save()
    to_sync()
    phases.clear()
    # Interleaved, so that a burst of load from other processes on the
    # machine hits all sides alike.
    # Process CPU seconds too: steadier than wall time on a shared machine
    # (time spent waiting for a core is left out).
    anchor_times, keras_times, sync_times = [], [], []
    cpu = {"anchor": [], "keras_own": [], "to_sync": []}
    for _ in range(repeats):
        for times, key, fn in ((anchor_times, "anchor", load_and_save),
                               (keras_times, "keras_own", keras_load_and_save),
                               (sync_times, "to_sync", to_sync)):
            start = time.process_time()
            times.append(best_of(1, fn)[0])
            cpu[key].append(time.process_time() - start)

    model = model_io.load_model(source)
    convert_only, convert_only_all = best_of(
        repeats, lambda: bnconvert.convert_model(model, verify=False)
    )
    convert_verify, convert_verify_all = best_of(
        repeats, lambda: bnconvert.convert_model(model)
    )
    n_bn = sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)
    return {
        "layers": len(model.layers),
        "bn": n_bn,
        "size_mb": source.stat().st_size / 2**20,
        "load": min(phases["load"]),
        "load_median": statistics.median(phases["load"]),
        "save": min(phases["save"]),
        "save_median": statistics.median(phases["save"]),
        "anchor": min(anchor_times),
        "anchor_median": statistics.median(anchor_times),
        "keras_own": min(keras_times),
        "keras_own_median": statistics.median(keras_times),
        "keras_load": min(phases["keras_load"]),
        "keras_load_median": statistics.median(phases["keras_load"]),
        "keras_save": min(phases["keras_save"]),
        "keras_save_median": statistics.median(phases["keras_save"]),
        "round_ratios": {
            "wall / anchor": _median_ratio(sync_times, anchor_times),
            "wall / Keras's own": _median_ratio(sync_times, keras_times),
            "CPU / anchor": _median_ratio(cpu["to_sync"], cpu["anchor"]),
            "CPU / Keras's own": _median_ratio(cpu["to_sync"], cpu["keras_own"]),
        },
        "cpu_medians": {key: statistics.median(v) for key, v in cpu.items()},
        "to_sync": min(sync_times),
        "to_sync_median": statistics.median(sync_times),
        "convert_only": convert_only,
        "convert_only_median": statistics.median(convert_only_all),
        "convert_verify": convert_verify,
        "convert_verify_median": statistics.median(convert_verify_all),
    }


def _median_ratio(numerators, denominators):
    """The median of the per-round ratios (rounds taken side by side)."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


# Keras maps and clones a Functional graph recursively, one level per layer
# or more: a 2,000-layer chain needs more than Python's default 1,000 frames.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))


def synthetic_chain(n_layers, width=16):
    """A Functional model of `n_layers` layers: Dense, BN, Dense, BN, ..."""
    inputs = keras.Input((width,))
    x = inputs
    for i in range(n_layers // 2):
        x = keras.layers.Dense(width, name=f"dense_{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn_{i}")(x)
    return keras.Model(inputs, x, name=f"chain_{n_layers}")


def scaling(sizes, repeats):
    rows = []
    for n in sizes:
        model = synthetic_chain(n)
        # Untimed warm-up at this size too: the first call traces more.
        bnconvert.convert_model(model, verify=False)
        convert, _ = best_of(repeats, lambda: bnconvert.convert_model(model, verify=False))
        full, _ = best_of(repeats, lambda: bnconvert.convert_model(model))
        rows.append({"layers": n, "convert": convert, "convert_verify": full})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="100,500,2000")
    parser.add_argument("--no-resnet", action="store_true")
    parser.add_argument("--ladder", metavar="RUNGS",
                        help="whole processes on B0,S,M,L,chain (see benchmarks/ladder.py)")
    parser.add_argument("--commands", default="to-sync,inspect", help="ladder commands")
    args = parser.parse_args(argv)
    if args.ladder:
        import ladder

        rows = ladder.run_ladder(args.ladder.split(","), args.commands.split(","), args.repeats)
        ladder.print_rows(rows, "to-sync <= 2.0x time and <= 1.5x RSS of load + save; "
                          "inspect <= 1.2x load; ms/layer B0 -> L <= 1.5x")
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"bnconvert {bnconvert.__version__}, keras {keras.__version__}, "
          f"{os.cpu_count()} CPUs, best of {args.repeats}")
    if not args.no_resnet:
        with tempfile.TemporaryDirectory() as tmp:
            r = resnet50_file_to_file(args.repeats, pathlib.Path(tmp))
        print()
        print(f"ResNet50 file -> file ({r['layers']} layers, {r['bn']} BN, "
              f"{r['size_mb']:.0f} MB)")
        print(f"  {'step':<40}{'best s':>8}{'x anchor':>10}{'median s':>10}")
        anchor = r["anchor"]
        table = [
            ("anchor: load + save", "anchor"),
            ("  load", "load"),
            ("  save", "save"),
            ("Keras's own load + save", "keras_own"),
            ("  load", "keras_load"),
            ("  save", "keras_save"),
            ("to-sync (load, convert, verify, save)", "to_sync"),
            ("  convert_model, verify=False", "convert_only"),
            ("  convert_model, verify=True", "convert_verify"),
        ]
        for label, key in table:
            print(f"  {label:<40}{r[key]:>8.2f}{r[key] / anchor:>10.2f}"
                  f"{r[key + '_median']:>10.2f}")
        print(f"  to-sync / anchor = {r['to_sync'] / anchor:.2f} (target <= 2.0; "
              f"medians {r['to_sync_median']:.2f} / {r['anchor_median']:.2f} = "
              f"{r['to_sync_median'] / r['anchor_median']:.2f})")
        print(f"  to-sync / Keras's own load + save = {r['to_sync'] / r['keras_own']:.2f} "
              f"(medians {r['to_sync_median'] / r['keras_own_median']:.2f})")
        print("  process CPU s, medians: " + ", ".join(
            f"{key} {value:.2f}" for key, value in r["cpu_medians"].items()))
        print("  to-sync per round, median of ratios: " + ", ".join(
            f"{key} {value:.2f}" for key, value in r["round_ratios"].items()))

    rows = scaling(sizes, args.repeats)
    base = rows[0]
    print()
    print("Synthetic Dense/BN chains, in memory (target: per-layer time flat)")
    print(f"  {'layers':>7}{'convert s':>11}{'ms/layer':>10}{'ratio':>7}"
          f"{'+verify s':>11}{'ms/layer':>10}{'ratio':>7}")
    for row in rows:
        per = row["convert"] / row["layers"]
        per_full = row["convert_verify"] / row["layers"]
        print(f"  {row['layers']:>7}{row['convert']:>11.2f}{per * 1e3:>10.2f}"
              f"{per / (base['convert'] / base['layers']):>7.2f}"
              f"{row['convert_verify']:>11.2f}{per_full * 1e3:>10.2f}"
              f"{per_full / (base['convert_verify'] / base['layers']):>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
