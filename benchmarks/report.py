"""Writes `docs/benchmarks.md` from the JSON results in `docs/benchmarks/`.

Usage (from the repository root):

    python benchmarks/report.py          # writes docs/benchmarks.md
    python benchmarks/report.py --check  # exits 1 if the page differs

The page has one section per JSON file: what it measures, the command that
wrote it, the machine and versions recorded in it (or, for a file that
records none, those stated here), the problem's configuration, and its
table, with what the table shows. The summary at the top is computed from
the same files. A JSON file in `docs/benchmarks/` that no section names is
an error, so that no result goes unreported.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

try:
    import benchmarks  # noqa: F401
except ImportError:  # run as `python benchmarks/report.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_mnist import markdown as mnist_markdown  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "benchmarks")
PAGE = os.path.join(ROOT, "docs", "benchmarks.md")
BACKEND_NAMES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}

_HEAD = (
    "`benchmarks/bench_head.py` times a whole training step (forward, "
    "cross-entropy, backward into the features and the kernel, "
    "SGD-with-momentum update) of heads with the same inputs: "
    "`keras.layers.Dense(C, use_bias=False)`, `LSoftmaxDense(C, margin=4)`"
)

_FAMILY_NOTES = {
    "tensorflow": [
        "The heads that normalise the class weights make no normalised "
        "copy of the (C, D) kernel: the op scales the logits' columns by "
        "1/‖w_j‖ and turns the kernel's gradient into the one through the "
        "norms itself (`ops.margin_logits(..., normalize_weights=True)`), "
        "so the backward pass keeps neither the unscaled logits nor a "
        "(B, C) product for the norms' gradient.",
        "The heads take 1.03–1.21 times Dense's time with XLA and "
        "1.04–1.27 without (IQRs up to a third of the medians). About "
        "half of the extra time is the "
        "gradient through the norms: C dot products of the kernel's rows "
        "with their gradient and the update of that gradient, two passes "
        "over (C, D) arrays that take about 15 ms outside XLA, where "
        "Dense's whole step takes 75 to 95 ms.",
        "Under XLA on a CPU the op computes the kernel's row norms and "
        "those dot products as an elementwise product followed by a "
        "matrix-vector product, which XLA runs 1.8 to 2.5 times as fast "
        "as its row reduction: 2.2 ms for the norms of the (C, D) kernel, "
        "2.6 ms for the dot products.",
        "Outside XLA the gradient through the norms updates the kernel's "
        "gradient in place, in 16 blocks of classes, so the step holds no "
        "(C, D) temporary beside that gradient: its peak is 0.84–0.96 "
        "times Dense's in the table. TensorFlow's in-place updates run on "
        "one thread, which costs about 4 ms a step.",
        "Memory, read from TensorFlow's own allocator instead of the "
        "resident set (`--memory allocator` with "
        "`TF_CPU_ALLOCATOR_USE_BFC=true`): with XLA, CosFace needs 1.00 "
        "times Dense's peak (43.97 MiB both); without XLA the heads need "
        "0.95–1.19 times Dense's, which itself varies from 52 to 74 MiB "
        "with the order in which TensorFlow runs the step's operations.",
    ],
    "jax": [
        "Compiled (`jax.jit`, Keras's default on JAX) the heads take "
        "less time than Dense. The resident-set probe of the "
        "compiled step counts the pages that malloc hands out afresh, "
        "which depends on what the previous step freed: it puts Dense's "
        "compiled peak anywhere from 22 to 51 MiB. The section after "
        "the next one reads the compiled step's memory from XLA itself.",
        "Not compiled, JAX runs the layer's code op by op; the heads need "
        "0.89–0.95 times Dense's peak memory and 0.95–0.97 times its time. "
        "Outside `jit` the op's backward pass keeps the caller's kernel, "
        "not a copy of it: a cast to the dtype the kernel already has is "
        "skipped, since under autodiff JAX would copy the kernel and keep "
        "the copy for the backward pass.",
    ],
    "torch": [
        "Eager, the heads need 1.02–1.05 times Dense's peak memory. "
        "Compiled (`torch.compile`), Dense's step needs under 10 MiB "
        "beyond its variables and the heads 1.05–1.11 times that; the "
        "resident-set probe varies by about 0.5 MiB, 5 % of Dense's "
        "compiled peak. The backward pass scales the upstream gradient by "
        "the weights' norms one block of classes at a time (C/64 classes, "
        "at least 128), and the normalisation's gradient is a custom op "
        "that updates the kernel's gradient in place: written as plain "
        "ops, the compiler fuses them into a kernel that writes a second "
        "(C, D) buffer.",
        "Eager, normalised class weights cost passes over the (C, D) "
        "kernel and its gradient that a compiler would fuse: the norms, "
        "the scales of the gradient, C dot products and the update of the "
        "normalisation's gradient. At C = 10 000, D = 512, B = 256, the "
        "backward pass's products take 45 ms, Dense's 36 ms.",
        "When other processes share the 2 cores, the ratios range from "
        "0.9 to 1.7 times Dense, with IQRs as large as the medians.",
    ],
}

_PARTIAL_FC_NOTES = {
    "tensorflow": [
        "The sampled step takes 0.14–0.27 times the Dense step's time "
        "(median 0.25), with the Dense step taking 3.4 to 6.8 s.",
        "Its peak memory is not well under Dense's: 0.97 times it above "
        "the baseline (0.79–0.97). Keras's Adam updates "
        "the whole (C, D) kernel every step as a chain of element-wise "
        "operations, each a (C, D) temporary (512 MB) outside XLA; with "
        "the kernel and its two moments that sets both peaks. With plain "
        "SGD (`--optimizer sgd`), which TensorFlow applies to the kept "
        "rows only, the sampled step takes 0.18 times the time and 0.54 "
        "times the peak; with `keras_lsoftmax.optimizers.LazyAdam` 0.15 "
        "and 0.55 (its own section below).",
        "Building either model peaks about 1.5 GB above the baseline "
        "(the initializer's (C, D) temporaries); the timed fits' own peak "
        "is the whole run's.",
    ],
    "jax": [
        "Compiled, the sampled step takes 0.17 times the Dense step's "
        "time and 0.48 times its peak memory above the baseline. "
        "Compiled, Adam's update of the whole kernel is open to fusion "
        "into one pass, which leaves the logits, (B, C) for Dense and "
        "(B, S) sampled, as the difference.",
    ],
    "torch": [
        "Eager PyTorch runs the sampled step at 0.46 times the Dense "
        "step's time and 0.70 times its peak memory: Adam's update runs op "
        "by op over the whole (C, D) kernel and the gradient of the "
        "gathered rows is a dense (C, D) array, passes over the kernel "
        "that do not shrink with r. With `keras_lsoftmax.optimizers."
        "LazyAdam`: 0.16 and 0.51 (its own section below).",
    ],
}

_LAZY_ADAM_NOTES = {
    "tensorflow": [
        "The sampled step takes 0.15 times the Dense step's time and 0.55 "
        "times its peak memory above the baseline, against 0.25 and 0.97 "
        "with Adam: LazyAdam gathers, updates and writes back the 100 000 "
        "kept rows instead of passing over the 1 000 000. What remains is "
        "mostly the kernel and its two moments (1.5 GB).",
    ],
    "jax": [
        "Compiled, LazyAdam computes every row in one fused pass and keeps "
        "the untouched ones: 0.21 times the Dense step's time and 0.58 "
        "times its peak, against 0.17 and 0.48 with Adam (the JAX section "
        "of Partial FC above); "
        "the mask costs one more read of the gradient.",
    ],
    "torch": [
        "Eager, the sampled step takes 0.16 times the Dense step's time "
        "and 0.51 times its peak memory, against 0.46 and 0.70 with Adam: "
        "the update costs the kept rows, not the whole kernel.",
    ],
}

_LAZY_ADAM_COMPILED_NOTES = {
    "tensorflow": [
        "Under XLA, LazyAdam computes every row in one fused pass and keeps "
        "the untouched ones: the sampled step takes 0.26 times the Dense "
        "step's time (per-round median 0.28) and 0.57 times its peak "
        "memory above the baseline; Adam under XLA gives 0.25 and 0.64 "
        "(the TensorFlow with XLA section above). The "
        "Dense step's time has an IQR of 1776 ms around its median of "
        "6155 ms.",
    ],
    "torch": [
        "Compiled, the sampled step takes 0.15 times the Dense step's time "
        "and 0.53 times its peak memory, against 0.16 and 0.53 with Adam "
        "under `torch.compile` (the PyTorch with torch.compile section "
        "above): compiled, the masked update costs what Adam's costs.",
    ],
}

_PARTIAL_FC_ACCURACY_NOTES = [
    "At r = 0.1 L-Softmax gains 1.32 points of accuracy and CosFace loses "
    "2.13. With `--seed 1` (another task, initial weights and samples): "
    "+1.14 and −2.06 points. See [Partial FC](partial-fc.md) for other "
    "settings.",
    "L-Softmax runs with a floor of 10 for λ (`lambda_minimum=10`, its "
    "default beyond 10 classes): with a floor of 2 its logits collapse to 0 "
    "on this task, in the 4th of 10 epochs at r = 1 and in the 5th at "
    "r = 0.1 (chance accuracy; `fit` warns). "
    "See [Choosing m and λ](choosing-m-and-lambda.md).",
]

# One section per JSON file, in the page's order: "file", "title",
# "measures" (what the script times), "command", "notes" (what the table
# shows) and, for a file that records no machine, "machine".
SECTIONS: list[dict[str, Any]] = [
    {
        "file": "bench_head_cpu.json",
        "title": "The head's training step, TensorFlow",
        "measures": _HEAD + " and a straightforward autodiff implementation "
        "of the same margin math (`benchmarks/autodiff_reference.py`, not "
        "part of the package). The variants run interleaved after warm-up; "
        "the table gives medians and the ratio to Dense in the same run and "
        "compile mode, and the peak memory of a step (CPU: resident memory "
        "of a child process; GPU: the TensorFlow allocator's peak).",
        "command": "python benchmarks/bench_head.py "
        "--out docs/benchmarks/bench_head_cpu.json",
        "notes": [
            "The margin costs a few percent of a Dense step or less, with "
            "and without XLA (`jit_compile=True`, the Keras default on "
            "GPUs). At C = 1000 a ratio's spread is about ±0.04 (see the "
            "IQR column).",
            "At C = 10 000 and 100 000 the L-Softmax step is even faster and "
            "smaller than Dense's. This comes from the kernel layout, not "
            "the margin: `LSoftmaxDense` stores one row per class, (C, D), "
            "and TensorFlow's CPU matrix products are faster for that layout "
            "than for Dense's (D, C) kernel.",
            "Besides Dense's three matrix products, the op touches only the "
            "B labelled rows of the kernel and the B labelled entries of the "
            "logits and of their gradient: the class weights are gathered as "
            "B contiguous rows, and the radial term of the kernel gradient "
            "is added to the B labelled rows in place. With C ≤ B classes, a "
            "pass over the whole (small) kernel is used instead.",
            "Outside XLA, TensorFlow's `tf.tensor_scatter_nd_add` / "
            "`_update` copy their whole input on every call: their kernel "
            "tries to reuse the buffer of the `updates` argument, never that "
            "of the tensor. At C = 100 000 those copies cost about 150 ms of "
            "a 1 s step. The op uses `ScatterNdNonAliasingAdd`, which "
            "updates in place. Under XLA it keeps `tensor_scatter_nd_add`, "
            "which XLA updates in place by itself.",
            "At every C the L-Softmax step is faster and smaller than the "
            "autodiff formulation.",
        ],
    },
    {
        "file": "bench_head_features_cpu.json",
        "title": "Linear probe (frozen features), TensorFlow",
        "measures": _HEAD + ", with the features trained (as above) and "
        "frozen (`--features frozen`): the step of a head trained on fixed "
        "features, where only the kernel gets a gradient, for Dense as for "
        "L-Softmax. Both settings run in the same rounds.",
        "command": "python benchmarks/bench_head.py --classes 1000 10000 "
        "100000 --features trained frozen --variants dense lsoftmax "
        "--repeats 20 --out docs/benchmarks/bench_head_features_cpu.json",
        "notes": [
            "Outside XLA, with more classes than samples, the op runs its "
            "forward pass as one small XLA computation on CPU-only machines: "
            "TensorFlow's CPU matrix product has no fast orientation for "
            "x·Wᵀ with a (C, D) kernel, and the (B, C) transpose it would "
            "need costs some 3 ms of a 55 ms step at C = 10 000, which the "
            "feature gradient no longer hides when the features are frozen. "
            "The backward pass stays in TensorFlow.",
            "At C = 1000 the op's fixed cost (a few dozen small kernels, "
            "about 1 ms) still shows on frozen features: 1.07 to 1.14 times "
            "Dense.",
        ],
    },
    {
        "file": "bench_fit_cpu.json",
        "title": "Through `fit` and `train_on_batch`, TensorFlow",
        "measures": "`benchmarks/bench_fit.py` times what a user runs: "
        "`train_on_batch` and `fit` of `keras_lsoftmax.Sequential([Input(("
        "512,)), LSoftmaxDense(C, margin=4)])` against "
        "`keras.Sequential([Input((512,)), Dense(C, use_bias=False)])`, "
        "both compiled with SGD (momentum 0.9), sparse cross-entropy and "
        "`metrics=[\"accuracy\"]`, B = 256. The margin model's `train_step` "
        "also hands the labels to the head, puts the plain target logits "
        "back for the metrics (an O(B) update, which reuses the logits' "
        "buffer once the loss is done with it) and logs λ and θ.",
        "command": "python benchmarks/bench_fit.py --classes 1000 10000 "
        "--repeats 30 --out docs/benchmarks/bench_fit_cpu.json",
        "notes": [
            "At C = 1000 a step is 11 to 16 ms and its fixed costs weigh "
            "more (1.08 to 1.19 times Dense); the `fit` row's ratio is "
            "0.97 to 1.32.",
        ],
    },
    {
        "file": "bench_mnist_cpu.json",
        "title": "A small MNIST CNN, TensorFlow",
        "measures": "`benchmarks/bench_mnist.py` times epochs of a small "
        "MNIST CNN (two 3×3 convs, 32 and 64 filters, each with a 2×2 max "
        "pool, then Dense(128)) with a Dense head and with "
        "`LSoftmaxDense(10, margin=4)`: 60000 images, batch 128, SGD with "
        "momentum 0.9, one warm-up and three timed epochs per head, "
        "interleaved.",
        "command": "python benchmarks/bench_mnist.py "
        "--out docs/benchmarks/bench_mnist_cpu.json",
        "machine": "the same 2-core x86-64 CPU as the other sections, "
        "TensorFlow 2.21, Keras 3.15 (this file records no machine)",
        "notes": [
            "The head is a small part of the epoch, and epochs vary by ±10% "
            "on this machine.",
        ],
    },
    {
        "file": "bench_head_tensorflow.json",
        "title": "Every backend: TensorFlow",
        "measures": "The step of the first section, `LSoftmaxDense(C, "
        "margin=4)` against `Dense(C, use_bias=False)` only, on each Keras "
        "backend (this section and the next two).",
        "command": "python benchmarks/bench_head.py --backend tensorflow "
        "--classes 1000 10000 100000 --variants dense lsoftmax --repeats 10 "
        "--out docs/benchmarks/bench_head_tensorflow.json",
        "notes": [],
    },
    {
        "file": "bench_head_jax.json",
        "title": "Every backend: JAX",
        "measures": "As in the TensorFlow section, on JAX.",
        "command": "python benchmarks/bench_head.py --backend jax "
        "--classes 1000 10000 100000 --variants dense lsoftmax --repeats 10 "
        "--out docs/benchmarks/bench_head_jax.json",
        "notes": [
            "Not compiled (op by op), L-Softmax needs 0.77–0.82 times "
            "Dense's peak memory from C = 10 000 up, and 1.19 times at "
            "C = 1000 (6.1 against 5.2 MiB). Compiled (`jit`, Keras's "
            "default on JAX) is the faster of the two.",
        ],
    },
    {
        "file": "bench_head_torch.json",
        "title": "Every backend: PyTorch",
        "measures": "As in the TensorFlow section, on PyTorch (CPU build).",
        "command": "python benchmarks/bench_head.py --backend torch "
        "--classes 1000 10000 100000 --variants dense lsoftmax --repeats 10 "
        "--out docs/benchmarks/bench_head_torch.json",
        "notes": [
            "From C = 10 000 up, every backend runs the L-Softmax step at "
            "0.89–1.08 times Dense, compiled or not. Compiled (the Keras "
            "default on JAX and on GPUs), its peak memory is at most Dense's "
            "plus 6 %; TensorFlow and JAX need less than Dense.",
            "At C = 1 000 without compilation, PyTorch runs the L-Softmax "
            "step at 1.22 times Dense: there the per-step work outside the "
            "matrix products (a dozen (B, D) element-wise operations and the "
            "label checks, each dispatched from Python) is about 2 ms of a "
            "10 ms step. Compiled, the same case is 1.08.",
            "PyTorch keeps a variable's strides, so the kernel is stored "
            "row-major when it is created: a transposed (C, D) view would make "
            "every step 1.3–1.7 times a Dense step.",
        ],
    },
    *(
        {
            "file": f"bench_family_{backend}.json",
            "title": f"The large-margin family: {name}",
            "measures": (
                "The step of the first section through each head of the "
                "family, against `Dense(C, use_bias=False)` in the same "
                "run: `SphereFaceDense(C, margin=4)`, `CosFaceDense(C)` "
                "(m = 0.35, s = 64), `ArcFaceDense(C)` (m = 0.5, s = 64) and "
                "`ArcFaceDense(C, sub_centers=3)` (`arcface_sc3`, whose "
                "kernel has 3·C rows, so three times Dense's matrix "
                "products), each called with the labels in training; this "
                "section and the next two, one per backend."
                if backend == "tensorflow"
                else "As in the previous section, on "
                f"{name}{' (CPU build)' if backend == 'torch' else ''}."
            ),
            "command": f"python benchmarks/bench_head.py --backend {backend} "
            "--classes 10000 --variants dense sphereface cosface arcface "
            "arcface_sc3 --repeats 15 "
            f"--out docs/benchmarks/bench_family_{backend}.json",
            "notes": _FAMILY_NOTES[backend],
        }
        for backend, name in BACKEND_NAMES.items()
    ),
    {
        "file": "bench_family_jax_xla.json",
        "title": "The large-margin family: compiled memory on JAX",
        "measures": (
            "The compiled (`jax.jit`) steps of the JAX family section, at "
            "C = 10 000 and 100 000, with L-Softmax too. Their memory comes "
            "from XLA's buffer assignment of each compiled step (`--memory "
            "xla`): the temporaries it preallocates, plus the outputs that "
            "do not reuse a donated input. That is what the step allocates "
            "on any device, and it is the same on every run."
        ),
        "command": "python benchmarks/bench_head.py --backend jax "
        "--classes 10000 100000 --variants dense lsoftmax sphereface "
        "cosface arcface arcface_sc3 --jit-only --memory xla --repeats 15 "
        "--out docs/benchmarks/bench_family_jax_xla.json",
        "notes": [
            "Compiled, every head of the family needs 0.75–0.79 times the "
            "memory of the Dense step at both sizes, so it stays within "
            "Dense's plus 10 %. L-Softmax needs exactly Dense's. With 3 "
            "sub-centres, whose kernel has 3·C rows, ArcFace needs 3.5 "
            "times.",
            "The times of this table vary more than those of the family "
            "sections above, with IQRs of 5–30 % of the medians. Its memory "
            "figures come from XLA's buffer assignment, the same in every "
            "run.",
        ],
    },
    {
        "file": "scheduler_overhead_tensorflow.json",
        "title": "λ schedule inside the step: TensorFlow",
        "measures": "`benchmarks/bench_fit.py --scheduler-overhead` times "
        "`fit` of a small model (Input(64) → Dense(64) → "
        "`LSoftmaxDense(10)`, batch 128, 100 batches × 2 epochs per "
        "sample) without a callback, with `LambdaScheduler(InverseDecay("
        "...))` (λ computed in the step) and with `LambdaScheduler(lambda "
        "step: ...)` (a plain callable, evaluated on the host before every "
        "batch), interleaved; this section and the next two, one per "
        "backend.",
        "command": "python benchmarks/bench_fit.py --backend tensorflow "
        "--scheduler-overhead --repeats 40 "
        "--out docs/benchmarks/scheduler_overhead_tensorflow.json",
        "notes": [],
    },
    {
        "file": "scheduler_overhead_jax.json",
        "title": "λ schedule inside the step: JAX",
        "measures": "As in the previous section, on JAX.",
        "command": "python benchmarks/bench_fit.py --backend jax "
        "--scheduler-overhead --repeats 40 "
        "--out docs/benchmarks/scheduler_overhead_jax.json",
        "notes": [],
    },
    {
        "file": "scheduler_overhead_torch.json",
        "title": "λ schedule inside the step: PyTorch",
        "measures": "As in the previous two sections, on PyTorch.",
        "command": "python benchmarks/bench_fit.py --backend torch "
        "--scheduler-overhead --repeats 40 "
        "--out docs/benchmarks/scheduler_overhead_torch.json",
        "notes": [
            "The in-step schedule adds a handful of scalar operations to the "
            "step, which cost less than the step's IQR (15–25 % of a "
            "step). The host-side "
            "callable costs a synchronisation per batch: 1.19 times on "
            "TensorFlow and 2.07 times on JAX, whose compiled step is "
            "otherwise asynchronous.",
        ],
    },
    *(
        {
            "file": f"bench_partial_fc_{backend}.json",
            "title": f"Partial FC at a million classes: {name}",
            "measures": (
                "`benchmarks/bench_partial_fc.py` times `fit` steps of "
                "`keras_lsoftmax.Sequential([Input((64,)), Dense(128, "
                "relu), LSoftmaxDense(1_000_000, sample_rate=0.1)])` "
                "(S = 100 000 classes per step, see "
                "[Partial FC](partial-fc.md)) against the same backbone "
                "with `keras.layers.Dense(1_000_000, use_bias=False)`, both "
                "with Adam (1e-3) and sparse cross-entropy, B = 256, "
                "features trained, labels over all C classes. Each model "
                "runs in a process of its own, which gives its peak "
                "resident memory; the timing rounds alternate between "
                "the two. This section and the next two, one per backend, "
                "each on Keras's default compilation (XLA off on "
                "TensorFlow's CPU, `jax.jit`, no `torch.compile`)."
                if backend == "tensorflow"
                else f"As in the previous section, on {name}"
                f"{' (CPU build)' if backend == 'torch' else ''}."
            ),
            "command": f"python benchmarks/bench_partial_fc.py --backend "
            f"{backend} --out docs/benchmarks/bench_partial_fc_{backend}.json",
            "notes": _PARTIAL_FC_NOTES[backend],
        }
        for backend, name in BACKEND_NAMES.items()
    ),
    {
        "file": "bench_partial_fc_tensorflow_jit.json",
        "title": "Partial FC at a million classes: TensorFlow with XLA",
        "measures": "As in the TensorFlow section, with "
        "`compile(jit_compile=True)`: XLA, which Keras turns on by default "
        "on GPUs.",
        "command": "python benchmarks/bench_partial_fc.py --backend "
        "tensorflow --jit-compile "
        "--out docs/benchmarks/bench_partial_fc_tensorflow_jit.json",
        "notes": [
            "With XLA the sampled step takes 0.25 times the Dense step's "
            "time and 0.64 times its peak memory above the baseline, "
            "against 0.97 without XLA, mostly because Dense's peak is "
            "higher under XLA on this CPU (5927 MB above the baseline, "
            "against 4065 MB without); the sampled step's own peak is about "
            "the same with and without XLA (3777 and 3926 MB).",
        ],
    },
    {
        "file": "bench_partial_fc_torch_jit.json",
        "title": "Partial FC at a million classes: PyTorch with torch.compile",
        "measures": "As in the PyTorch section, with "
        "`compile(jit_compile=True)`: Keras compiles the train step with "
        "`torch.compile`.",
        "command": "python benchmarks/bench_partial_fc.py --backend torch "
        "--jit-compile --out docs/benchmarks/bench_partial_fc_torch_jit.json",
        "notes": [
            "Compiled, the sampled step takes 0.16 times the Dense step's "
            "time and 0.53 times its peak memory above the baseline, "
            "against 0.46 and 0.70 eager (3752 and 8159 ms per step, "
            "3776 and 5394 MB eager): compiling cuts the sampled "
            "step's time by 6.9 times and Dense's by 2.3. On the 300-class "
            "task of `--accuracy --classes 300 --backend torch`, training "
            "with and without `--jit-compile` gives the same test "
            "accuracies and final losses to the printed digits (L-Softmax "
            "0.8420 at r = 1 and 0.8633 at r = 0.1, CosFace 0.8733 and "
            "0.8750).",
        ],
    },
    *(
        {
            "file": f"bench_partial_fc_{backend}_lazyadam.json",
            "title": f"Partial FC at a million classes with LazyAdam: {name}",
            "measures": (
                "As in the TensorFlow section of Partial FC, with "
                "`keras_lsoftmax.optimizers.LazyAdam` for the sampled "
                "model, which updates only the rows with a non-zero "
                "gradient (see [Partial FC](partial-fc.md#updating-only-the-"
                "kept-rows-lazyadam)); the Dense model keeps Keras's Adam, "
                "whose update is the same where every row is touched. This "
                "section and the next two, one per backend."
                if backend == "tensorflow"
                else f"As in the previous section, on {name}"
                f"{' (CPU build)' if backend == 'torch' else ''}."
            ),
            "command": f"python benchmarks/bench_partial_fc.py --backend "
            f"{backend} --optimizer lazyadam "
            f"--out docs/benchmarks/bench_partial_fc_{backend}_lazyadam.json",
            "notes": _LAZY_ADAM_NOTES[backend],
        }
        for backend, name in BACKEND_NAMES.items()
    ),
    *(
        {
            "file": f"bench_partial_fc_{backend}_jit_lazyadam.json",
            "title": f"Partial FC at a million classes with LazyAdam: {name}",
            "measures": "As in the LazyAdam sections, with "
            "`compile(jit_compile=True)`.",
            "command": f"python benchmarks/bench_partial_fc.py --backend "
            f"{backend} --jit-compile --optimizer lazyadam --out "
            f"docs/benchmarks/bench_partial_fc_{backend}_jit_lazyadam.json",
            "notes": _LAZY_ADAM_COMPILED_NOTES[backend],
        }
        for backend, name in (
            ("tensorflow", "TensorFlow with XLA"),
            ("torch", "PyTorch with torch.compile"),
        )
    ),
    {
        "file": "bench_sharded_partial_fc.json",
        "title": "Partial FC on a class-sharded head, JAX",
        "measures": "`benchmarks/bench_sharded.py` times `fit` of a "
        "`LSoftmaxDense(C, sample_rate=0.1)` head and of "
        "`keras.layers.Dense(C, use_bias=False)`, each sharded by class over "
        "4 host devices with `keras.distribution.ModelParallel` and "
        "unsharded, each configuration in a process of its own "
        "([Sharding](sharding.md)).",
        "command": "python benchmarks/bench_sharded.py --classes 1000000 "
        "--sample-rate 0.1 --configs sharded_dense sharded unsharded_dense "
        "unsharded --repeats 3 "
        "--out docs/benchmarks/bench_sharded_partial_fc.json",
        "notes": [
            "Sharded, the sampled step takes 0.24 times the Dense step's "
            "time and 0.59 times its peak memory above the memory before "
            "the model; unsharded 0.20 and 0.57. What remains is mostly the "
            "kernel and its Adam state, which the 4 host devices hold in "
            "the host's memory together, and Adam's pass over the whole "
            "kernel.",
        ],
    },
    {
        "file": "bench_sharded_partial_fc_lazyadam.json",
        "title": "Partial FC on a class-sharded head with LazyAdam, JAX",
        "measures": "As in the previous section, sharded only, with "
        "`keras_lsoftmax.optimizers.LazyAdam` for the sampled model; the "
        "Dense model keeps Keras's Adam.",
        "command": "python benchmarks/bench_sharded.py --classes 1000000 "
        "--sample-rate 0.1 --optimizer lazyadam --configs sharded_dense "
        "sharded --repeats 3 "
        "--out docs/benchmarks/bench_sharded_partial_fc_lazyadam.json",
        "notes": [
            "The sampled step takes 0.30 times the sharded Dense step's "
            "time and 0.68 times its peak memory above the memory before "
            "the model, against 0.24 and 0.59 with Adam (previous "
            "section). Compiled, LazyAdam computes every row and keeps "
            "the untouched ones, so on JAX it buys Adam's rule on the kept "
            "rows only, at the cost of the mask's extra pass.",
        ],
    },
    {
        "file": "bench_partial_fc_accuracy.json",
        "title": "Partial FC accuracy on a 2000-class task, TensorFlow",
        "measures": "`benchmarks/bench_partial_fc.py --accuracy` trains "
        "the same network (the same seeded weights and shuffles) with "
        "`sample_rate=1` and `sample_rate=0.1` on a synthetic task whose "
        "classes are Gaussian prototypes plus noise, and reports the "
        "accuracy over all classes on held-out samples, for "
        "`LSoftmaxDense(margin=4, lambda_minimum=10)` and `CosFaceDense` "
        "(m = 0.35, s = 64).",
        "command": "python benchmarks/bench_partial_fc.py --accuracy "
        "--out docs/benchmarks/bench_partial_fc_accuracy.json",
        "notes": _PARTIAL_FC_ACCURACY_NOTES,
    },
    {
        "file": "bench_partial_fc_accuracy_lazyadam.json",
        "title": "Partial FC accuracy on a 2000-class task with LazyAdam, "
        "TensorFlow",
        "measures": "As in the previous section, every model trained with "
        "`keras_lsoftmax.optimizers.LazyAdam` (1e-3).",
        "command": "python benchmarks/bench_partial_fc.py --accuracy "
        "--optimizer lazyadam "
        "--out docs/benchmarks/bench_partial_fc_accuracy_lazyadam.json",
        "notes": [
            "With LazyAdam, r = 0.1 costs CosFace 0.64 points of accuracy "
            "(2.13 with Adam) and gains L-Softmax 2.63 (1.32 with Adam); "
            "at r = 1 the accuracies are Adam's to 0.0001. With `--seed 1`: "
            "−0.24 and +2.68 points. Adam keeps moving the rows a step "
            "did not keep by their momentum.",
        ],
    },
    {
        "file": "bench_partial_fc_accuracy_lazymomentum.json",
        "title": "Partial FC accuracy on a 2000-class task with LazySGD, "
        "TensorFlow",
        "measures": "As in the previous two sections, every model trained "
        "with `keras_lsoftmax.optimizers.LazySGD(0.1, momentum=0.9)`, the "
        "optimizer of insightface's Partial FC without its weight decay.",
        "command": "python benchmarks/bench_partial_fc.py --accuracy "
        "--optimizer lazymomentum --learning-rate 0.1 "
        "--out docs/benchmarks/bench_partial_fc_accuracy_lazymomentum.json",
        "notes": [
            "At r = 1 the accuracies are those of Keras's `SGD` with "
            "momentum 0.9 to the printed digits (`--optimizer momentum "
            "--learning-rate 0.1`, the same task: L-Softmax 0.5933, CosFace "
            "0.7672), as they must be where every row has a gradient.",
            "At r = 0.1, CosFace loses 3.21 points with LazySGD and 3.05 "
            "with Keras's SGD with momentum, against 0.64 with LazyAdam "
            "(previous section). L-Softmax gains 4.19 points with LazySGD "
            "and 0.58 with Keras's SGD. Both at learning rate 0.1.",
        ],
    },
]

SMOKE_COMMANDS = [
    "python benchmarks/bench_head.py --smoke",
    "python benchmarks/bench_fit.py --smoke",
    "python benchmarks/bench_fit.py --scheduler-overhead --smoke",
    "python benchmarks/bench_mnist.py --smoke",
    "python benchmarks/bench_partial_fc.py --smoke",
    "python benchmarks/bench_partial_fc.py --accuracy --smoke",
]


def load_results(directory: str) -> dict[str, dict[str, Any]]:
    """The JSON files of `directory`, by file name; every one must have a
    section."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
    known = {s["file"] for s in SECTIONS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(
            f"{directory}: no section in benchmarks/report.py for "
            f"{', '.join(unknown)}"
        )
    missing = sorted(known - set(names))
    if missing:
        raise SystemExit(f"{directory}: missing {', '.join(missing)}")
    results = {}
    for name in names:
        with open(os.path.join(directory, name)) as f:
            results[name] = json.load(f)
    return results


def _environment(result: dict[str, Any]) -> dict[str, Any] | None:
    """The machine and versions a result records (`config` for bench_head
    and bench_fit, top level for bench_mnist), or None."""
    env = result.get("config", result)
    return env if "platform" in env else None


def machine_line(result: dict[str, Any], stated: str | None) -> str:
    """"Measured on ...": the recorded machine and versions, else `stated`."""
    env = _environment(result)
    if env is None:
        return f"Measured on {stated}."
    backend = env.get("backend") or next(b for b in BACKEND_NAMES if b in env)
    return (
        f"Measured on {env['cpu_count']} CPU cores, {env['platform']}; "
        f"Python {env['python']}, {BACKEND_NAMES[backend]} {env[backend]}, "
        f"Keras {env['keras']}, keras_lsoftmax {env['keras_lsoftmax']}."
    )


def config_line(result: dict[str, Any]) -> str:
    """The problem and timing settings a result records."""
    config = result.get("config")
    if config is None:  # bench_mnist
        return (
            f"Images: {result['images']}, batch {result['batch_size']}, "
            f"{result['epochs_timed']} timed epochs per head."
        )
    if "description" in config:  # bench_partial_fc
        return f"Configuration: {config['description']}."
    parts = [
        f"C = {', '.join(map(str, config['classes']))}",
        f"B = {config['batch']}",
        f"D = {config['dim']}",
        config["dtype"],
        f"margin {config['margin']}",
        f"initial λ = {config['lam']:g}",
        f"{config['repeats']} interleaved rounds after {config['warmup']} "
        "warm-up calls",
    ]
    if config.get("mode") == "scheduler_overhead":
        parts.append(
            f"model: {config['model']}, {config['fit_batches']} batches × "
            f"{config['epochs']} epochs per sample, schedule "
            f"{config['schedule']}"
        )
    if "jit_meaning" in config:
        parts.append(f"jit: {config['jit_meaning']}")
    if config.get("jit_compile"):
        parts.append(f"jit_compile: {', '.join(config['jit_compile'])}")
    parts.append(f"device: {config['device'] or 'the backend placement'}")
    parts.append(f"loss: {config['loss']}")
    parts.append(f"optimizer: {config['optimizer']}")
    if config.get("memory_method"):
        parts.append(
            "peak memory: "
            + config.get("memory_method_detail", config["memory_method"])
        )
    return "Configuration: " + "; ".join(parts) + "."


def table(result: dict[str, Any]) -> str:
    """The result's own Markdown table (bench_mnist's, rebuilt)."""
    return result["markdown"] if "markdown" in result else mnist_markdown(result)


def _ratio_range(
    results: dict[str, dict[str, Any]], files: list[str],
    keep: Callable[[dict[str, Any]], bool],
) -> tuple[float, float]:
    """The smallest and largest `ratio_to_dense` of the L-Softmax rows of
    `files` that `keep` accepts."""
    ratios = [
        row["ratio_to_dense"]
        for name in files
        for row in results[name]["rows"]
        if row["variant"] == "lsoftmax" and keep(row)
    ]
    return min(ratios), max(ratios)


def _family_range(
    results: dict[str, dict[str, Any]], variants: tuple[str, ...], key: str
) -> tuple[float, float]:
    """The smallest and largest `key` ratio of the family rows `variants`,
    over every backend and compile mode."""
    ratios = [
        row[key]
        for backend in BACKEND_NAMES
        for row in results[f"bench_family_{backend}.json"]["rows"]
        if row["variant"] in variants
    ]
    return min(ratios), max(ratios)


def summary(results: dict[str, dict[str, Any]]) -> list[str]:
    """The page's opening lines, computed from `results`."""
    backends = [
        "bench_head_tensorflow.json", "bench_head_jax.json",
        "bench_head_torch.json",
    ]
    low, high = _ratio_range(results, backends, lambda r: r["classes"] >= 10000)
    fit_low, fit_high = _ratio_range(
        results, ["bench_fit_cpu.json"], lambda r: True
    )
    mnist = results["bench_mnist_cpu.json"]["ratio"]
    return [
        "An `LSoftmaxDense` training step costs about what a `Dense` step "
        f"costs: {low:.2f}–{high:.2f} times Dense from C = 10 000 classes "
        "up, on TensorFlow, JAX and PyTorch, compiled or not.",
        f"Through `fit` / `train_on_batch` it is {fit_low:.2f}–"
        f"{fit_high:.2f} times Dense, and a small MNIST CNN's epoch "
        f"{mnist:.2f} times, all on a 2-core x86-64 CPU.",
        *family_summary(results),
        "Every table below is written from the JSON files in "
        "`docs/benchmarks/` by `python benchmarks/report.py`.",
    ]


def family_summary(results: dict[str, dict[str, Any]]) -> list[str]:
    """The opening lines on the large-margin family."""
    heads = ("sphereface", "cosface", "arcface")
    low, high = _family_range(results, heads, "ratio_to_dense")
    mem_low, mem_high = _family_range(results, heads, "peak_ratio_to_dense")
    sc_low, sc_high = _family_range(
        results, ("arcface_sc3",), "ratio_to_dense"
    )
    xla = [
        row["peak_ratio_to_dense"]
        for row in results["bench_family_jax_xla.json"]["rows"]
        if row["variant"] in heads
    ]
    xla_low, xla_high = min(xla), max(xla)
    return [
        "A `SphereFaceDense`, `CosFaceDense` or `ArcFaceDense` step at "
        f"C = 10 000 costs {low:.2f}–{high:.2f} times a Dense step on the "
        "three backends, compiled or not, with "
        f"{mem_low:.2f}–{mem_high:.2f} times Dense's peak memory; with 3 "
        f"sub-centres (three times the classes' weights) ArcFace costs "
        f"{sc_low:.2f}–{sc_high:.2f} times Dense.",
        "Compiled on JAX, XLA's own buffer assignment gives them "
        f"{xla_low:.2f}–{xla_high:.2f} times the memory of the Dense step, "
        "at C = 10 000 and 100 000.",
    ]


def render(directory: str = RESULTS) -> str:
    """The whole page, from the JSON files of `directory`."""
    results = load_results(directory)
    lines = ["# Benchmarks", "", *summary(results), "", "## Reproduce", ""]
    lines += [
        "Each `--smoke` run takes 5 to 25 s on a 2-core CPU, needs no "
        "download and checks that a script runs end to end (its times mean "
        "nothing):",
        "",
        "```bash",
        *SMOKE_COMMANDS,
        "```",
        "",
        "The full runs, one a section below (each prints a line per "
        "configuration with the time left; the module docstrings give "
        "their run times), then this page:",
        "",
        "```bash",
        *(s["command"] for s in SECTIONS),
        "python benchmarks/report.py",
        "```",
    ]
    for section in SECTIONS:
        result = results[section["file"]]
        lines += [
            "",
            f"## {section['title']}",
            "",
            section["measures"],
            "",
            f"Command: `{section['command']}`",
            "",
            machine_line(result, section.get("machine")),
            "",
            config_line(result),
            "",
            table(result),
        ]
        if section["notes"]:
            lines.append("")
            lines += [f"- {note}" for note in section["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="report.py",
        description="Write docs/benchmarks.md from docs/benchmarks/*.json.",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="write nothing; exit 1 if docs/benchmarks.md differs from the "
        "page the JSON files give (default: off, write it)",
    )
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        try:
            with open(PAGE, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != page:
            print(
                f"{os.path.relpath(PAGE)} is not the page the JSON files "
                "give; run python benchmarks/report.py",
                file=sys.stderr,
            )
            return 1
        return 0
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {os.path.relpath(PAGE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
