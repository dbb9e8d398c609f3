"""The `--backend` of a benchmark script, read before Keras is imported.

Keras reads `KERAS_BACKEND` once, when it is first imported, so a script that
takes `--backend` must set the variable before its first `import keras` (its
own or that of any module it imports). This module imports no Keras.
"""

import argparse
import os
import sys

BACKENDS = ("tensorflow", "jax", "torch")


def select_backend(argv: list[str] | None = None) -> None:
    """Sets `KERAS_BACKEND` from a `--backend` in `argv`, if there is one.

    Without `--backend` the variable is left as it is, so Keras takes its own
    default (`KERAS_BACKEND`, else TensorFlow). The script's full parser
    declares the flag again, for `--help` and for its check that the backend
    Keras loaded is the one asked for.

    Args:
        argv: the command-line arguments; `sys.argv[1:]` by default.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--backend", choices=BACKENDS)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
