"""The shape of the code: no import cycle, a quiet import, a fast CLI, internals in one place."""

import ast
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "bnconvert"
# The command line and its start-up live beside the package (they must not import it early).
CLI_MODULES = [REPO / "bnconvert_cli.py", REPO / "bnconvert_cli_startup.py"]


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        cwd=REPO, env={**os.environ, **env},
    )


def test_import_graph_has_no_cycle():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "import_graph.py")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no import cycle" in proc.stdout
    assert "bnconvert.pipeline -> " in proc.stdout


def test_import_graph_script_detects_a_cycle(tmp_path):
    # The checker itself must be able to fail.
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import import_graph
    finally:
        sys.path.pop(0)
    assert import_graph.find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_graph.find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_registers_and_touches_nothing_else():
    code = (
        "import os, sys, json\n"
        "import keras, tensorflow  # their own import hooks are theirs\n"
        "before = dict(os.environ); hooks = list(sys.meta_path)\n"
        "import bnconvert\n"
        "added = [type(h).__name__ for h in sys.meta_path if h not in hooks]\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "registered = keras.saving.get_registered_object('bnconvert>SyncBatchNormalization')\n"
        "print(json.dumps([changed, added, registered is bnconvert.SyncBatchNormalization]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        cwd=REPO, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    changed, added, registered = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert changed == [] and registered
    # The only hook: the one-shot finder that registers the tf-keras twin.
    assert added in ([], ["_RegisterAfterImport"])


def test_package_redirects_no_descriptor():
    # Silencing TensorFlow's native start-up is the CLI's business (bnconvert_cli_startup.py).
    for path in PACKAGE.rglob("*.py"):
        assert "dup2" not in path.read_text(encoding="utf-8"), path


def test_help_and_version_do_not_import_tensorflow():
    code = (
        "import sys\n"
        "import bnconvert_cli\n"
        "for args in (['--help'], ['--version'], ['to-sync', '--help']):\n"
        "    try:\n"
        "        bnconvert_cli.main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print('TF' if 'tensorflow' in sys.modules or 'bnconvert' in sys.modules else 'clean')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "clean"
    assert "to-sync" in proc.stdout and "0.1.0" in proc.stdout


def test_modules_are_small():
    sizes = {
        p.name: len(p.read_text(encoding="utf-8").splitlines())
        for p in [*PACKAGE.rglob("*.py"), *CLI_MODULES]
    }
    # "About 400 lines": a few lines over is a docstring, not a second module.
    assert all(n <= 430 for n in sizes.values()), sizes


# Private names of Keras, tf-keras or TensorFlow; only the keras_internals package may use them.
_PRIVATE = re.compile(
    r"keras\.src|tf_keras\.src|tensorflow\.python|_keras_history|_nodes_by_depth|"
    r"_inbound_nodes|_inputs_struct|_tracker|\._layers\b|object\.__setattr__|"
    r"SafeModeScope|RevivedLayer"
)


def test_private_keras_names_only_in_keras_internals():
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *CLI_MODULES]:
        if "keras_internals" in path.relative_to(REPO).parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # Code only: docstrings and comments may name what they avoid.
        for node in ast.walk(tree):
            if isinstance(node, (ast.Attribute, ast.Name, ast.ImportFrom, ast.Import)):
                text = ast.unparse(node)
                if _PRIVATE.search(text):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {text}")
    assert not offenders, "\n".join(sorted(set(offenders)))
