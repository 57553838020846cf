"""Kernel-by-kernel comparison of two ONNX files in onnxruntime.

Builds both sessions as `benchmarks/export.py` does (one thread,
ORT_ENABLE_ALL), saves the graphs onnxruntime runs after its own fusions,
and matches their nodes one to one: same op type (domain included, so
`com.microsoft.nchwc`'s `Conv` is not ONNX's), same attributes, same input
and output shapes, same constant shapes. Nodes are matched in the order
onnxruntime saved them (its topological order), each to the first
unmatched node of the other graph with the same signature; matched pairs
out of the other side's order are counted. Of the nodes left, those of
one op type are paired in order and printed with what differs; the rest
are printed as only on one side.

Then both sessions are profiled (`enable_profiling`), the runs taking
turns (which one goes first alternating, as in the benchmark), and each
node's kernel time is summed over the runs. The table gives, per op type,
the time of the matched pairs on each side (their ratio is the noise
floor: the same kernel on the same shapes) and of the nodes only on one
side (the real difference), per run in microseconds.

Usage: python benchmarks/ort_kernels.py A.onnx B.onnx [--runs 300] [--size 224]
       [--top 15]
"""

import argparse
import bisect
import collections
import json
import os
import statistics
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort


def session(path, optimized=None, profile=None):
    """The session `benchmarks/export.py` builds, optionally saving or profiling."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized:
        options.optimized_model_filepath = optimized
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def signatures(path, tmp, x):
    """`[(node name, signature)]` of the optimized graph, in execution order.

    A signature is `(domain:op, attributes, input shapes, output shapes)`;
    a constant input shows as `("const", shape)`. Attributes at their
    default (zero pads, unit strides and dilations, one group) are left
    out and a negative `axis` is counted from the front, so that two
    spellings of one kernel match.
    """
    optimized = os.path.join(tmp, os.path.basename(path) + ".ort.onnx")
    session(path, optimized)
    model = onnx.load(optimized, load_external_data=False)
    shapes = _shapes(model, path, x)
    constants = {i.name: tuple(i.dims) for i in model.graph.initializer}
    rows = []
    for node in model.graph.node:
        ins = tuple(("const", constants[n]) if n in constants else shapes.get(n)
                    for n in node.input)
        outs = tuple(shapes.get(n) for n in node.output)
        attrs = tuple(sorted(_attributes(node, outs)))
        rows.append((node.name, (f"{node.domain or 'ai.onnx'}:{node.op_type}", attrs, ins, outs)))
    return rows


_DEFAULTS = {"pads": 0, "strides": 1, "dilations": 1}


def _attributes(node, outs):
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, (list, tuple)):
            value = tuple(value)
            if attr.name in _DEFAULTS and all(v == _DEFAULTS[attr.name] for v in value):
                continue
        elif not isinstance(value, (int, float, bytes, str)):
            value = str(type(value))
        if (attr.name, value) in (("group", 1), ("auto_pad", b"NOTSET")):
            continue
        if attr.name == "axis" and value < 0 and outs and outs[0]:
            value += len(outs[0])
        yield attr.name, value


def _shapes(model, path, x):
    """Every tensor's shape, read off the profile's `input_type_shape`/`output_type_shape`."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        s = session(path, profile=os.path.join(tmp, "shapes"))
        s.run(None, {s.get_inputs()[0].name: x})
        events = _events(s.end_profiling())
    nodes = {n.name: n for n in model.graph.node}
    for event in events:
        node = nodes.get(_node_name(event))
        if node is None:
            continue
        for names, key in ((node.input, "input_type_shape"), (node.output, "output_type_shape")):
            for name, entry in zip([n for n in names if n], event["args"].get(key, [])):
                out[name] = tuple(next(iter(entry.values())))
    return out


def _events(file):
    with open(file) as f:
        events = json.load(f)
    os.remove(file)
    return [e for e in events if e.get("cat") == "Node" and "args" in e]


def _node_name(event):
    """The node a kernel event timed ('' for other events: fences, sessions)."""
    name = event["name"]
    return name[:-len("_kernel_time")] if name.endswith("_kernel_time") else ""


def match(left, right):
    """`(pairs, only left, only right)`: indices matched in execution order by signature."""
    free = collections.defaultdict(collections.deque)
    for j, (_, sig) in enumerate(right):
        free[repr(sig)].append(j)
    pairs, only_left = [], []
    for i, (_, sig) in enumerate(left):
        queue = free[repr(sig)]
        if queue:
            pairs.append((i, queue.popleft()))
        else:
            only_left.append(i)
    taken = {j for _, j in pairs}
    return pairs, only_left, [j for j in range(len(right)) if j not in taken]


def reordered(pairs):
    """How many matched nodes run out of the other side's order (pairs minus the
    longest run of pairs in the same order on both sides)."""
    tails = []
    for _, j in sorted(pairs):
        k = bisect.bisect_left(tails, j)
        tails[k:k + 1] = [j]
    return len(pairs) - len(tails)


def near_misses(sides, only_a, only_b):
    """Unmatched nodes of one op type paired in order: `[(i, j, what differs)]`."""
    rest = collections.defaultdict(collections.deque)
    for j in only_b:
        rest[sides[1][j][1][0]].append(j)
    out = []
    for i in only_a:
        queue = rest[sides[0][i][1][0]]
        if queue:
            j = queue.popleft()
            a, b = sides[0][i][1], sides[1][j][1]
            what = [f"{k} {x} / {y}" for k, x, y in
                    (("attributes", dict(a[1]), dict(b[1])), ("inputs", a[2], b[2]),
                     ("outputs", a[3], b[3])) if x != y]
            out.append((i, j, "; ".join(what)))
    return out


def kernel_times(paths, x, runs, tmp):
    """Per file, `{node name: total kernel µs}` over `runs` runs taking turns."""
    sessions = [session(p, profile=os.path.join(tmp, f"p{i}")) for i, p in enumerate(paths)]
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, feed in zip(sessions, feeds):
        for _ in range(3):
            s.run(None, feed)
    for run in range(runs):
        order = (0, 1) if run % 2 == 0 else (1, 0)
        for i in order:
            sessions[i].run(None, feeds[i])
    totals = []
    for s in sessions:
        events = _events(s.end_profiling())
        per_node = collections.defaultdict(float)
        counts = collections.Counter()
        for e in events:
            if _node_name(e):
                per_node[_node_name(e)] += e["dur"]
                counts[_node_name(e)] += 1
        # Leave the warm-up runs out: each node ran runs + 3 times.
        totals.append({n: t * runs / counts[n] for n, t in per_node.items()})
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs=2)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--top", type=int, default=15, help="op types to list")
    args = parser.parse_args()
    ort.set_default_logger_severity(3)  # not the warning that NCHWc graphs are machine-specific
    x = np.random.default_rng(1).normal(size=(1, args.size, args.size, 3)).astype("float32")
    with tempfile.TemporaryDirectory() as tmp:
        sides = [signatures(p, tmp, x) for p in args.files]
        pairs, only_a, only_b = match(*sides)
        times = kernel_times(args.files, x, args.runs, tmp)
    print(f"A = {args.files[0]}\nB = {args.files[1]}")
    print(f"nodes run: A {len(sides[0])}, B {len(sides[1])}; matched {len(pairs)} "
          f"(same op, domain, attributes, shapes), {reordered(pairs)} of them out of "
          "the other side's execution order")
    near = near_misses(sides, only_a, only_b)
    for i, j, what in near:
        a, b = _us(times, 0, sides, i, args.runs), _us(times, 1, sides, j, args.runs)
        print(f"  differs: A #{i} / B #{j} {sides[0][i][1][0]}: {what}  {a:.1f} / {b:.1f} µs")
    paired = ({i for i, _, _ in near}, {j for _, j, _ in near})
    for label, side, only in (("A", 0, only_a), ("B", 1, only_b)):
        for i in only:
            if i in paired[side]:
                continue
            name, (op, attrs, ins, outs) = sides[side][i]
            print(f"  only {label} #{i:3} {op:28} {name[:40]:40} in {ins} out {outs} "
                  f"{dict(attrs) or ''}  {_us(times, side, sides, i, args.runs):.1f} µs")
    _print_times(sides, pairs, only_a, only_b, times, args.runs, args.top)


def _us(times, side, sides, i, runs):
    return times[side].get(sides[side][i][0], 0) / runs


def _print_times(sides, pairs, only_a, only_b, times, runs, top):
    """Per op type: matched A / B µs per run and their ratio; unmatched A and B µs."""
    rows = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0])
    ratios = []
    for i, j in pairs:
        op = sides[0][i][1][0]
        a, b = times[0].get(sides[0][i][0], 0), times[1].get(sides[1][j][0], 0)
        rows[op][0] += a / runs
        rows[op][1] += b / runs
        rows[op][4] += 1
        if a > 0 and b > 0:
            ratios.append(a / b)
    for side, only in ((0, only_a), (1, only_b)):
        for i in only:
            rows[sides[side][i][1][0]][2 + side] += times[side].get(sides[side][i][0], 0) / runs
    print(f"\nkernel time per run (µs), {runs} runs taking turns")
    print(f"{'op':34}{'pairs':>6}{'matched A':>11}{'matched B':>11}{'A/B':>7}"
          f"{'only A':>9}{'only B':>9}")
    order = sorted(rows, key=lambda op: -sum(rows[op][:4]))
    for op in order[:top]:
        a, b, oa, ob, n = rows[op]
        print(f"{op:34}{n:6}{a:11.1f}{b:11.1f}{a / b if b else float('nan'):7.3f}"
              f"{oa:9.1f}{ob:9.1f}")
    total = [sum(r[k] for r in rows.values()) for k in range(4)]
    print(f"{'total':40}{total[0]:11.1f}{total[1]:11.1f}{total[0] / total[1]:7.3f}"
          f"{total[2]:9.1f}{total[3]:9.1f}")
    print(f"whole graph A / B: {(total[0] + total[2]) / (total[1] + total[3]):.3f}; "
          f"matched pairs' per-node ratio: median {statistics.median(ratios):.3f}, "
          f"quartiles {np.percentile(ratios, 25):.3f} to {np.percentile(ratios, 75):.3f}")


if __name__ == "__main__":
    sys.exit(main())
