"""Tests of `import keras_lsoftmax`: it leaves Keras's global state alone.

Each check runs in a fresh Python process under the suite's backend, once
with the import and once without, so the two see the same Keras.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras

_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Sets floatx after the (optional) import, then reads what a new layer and
# the global policy use and what a seeded draw gives.
_PROBE = """
import json
import sys

import keras
import numpy as np

if sys.argv[1] == "import":
    import keras_lsoftmax  # noqa: F401

keras.config.set_floatx("float64")
dense = keras.layers.Dense(2)
dense.build((None, 3))
kernel_dtype = keras.backend.standardize_dtype(dense.kernel.dtype)
policy = keras.config.dtype_policy().name
keras.utils.set_random_seed(1234)
draws = {
    "keras": keras.ops.convert_to_numpy(
        keras.random.normal((4,), dtype="float32")
    ).tolist(),
    "numpy": np.random.random(4).tolist(),
}
print(json.dumps({"kernel": kernel_dtype, "policy": policy, "draws": draws}))
"""


def _probe(mode):
    env = dict(
        os.environ,
        KERAS_BACKEND=keras.backend.backend(),
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])
        ),
    )
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_leaves_the_keras_global_state_alone():
    without_import, with_import = _probe("plain"), _probe("import")
    # floatx set after the import still reaches new layers and the policy.
    assert without_import["kernel"] == "float64"
    assert with_import["kernel"] == "float64"
    assert with_import["policy"] == without_import["policy"] == "float64"
    # The import draws no random numbers from the seeded generators.
    assert with_import["draws"] == without_import["draws"]
