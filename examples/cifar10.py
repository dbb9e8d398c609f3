"""CIFAR-10 with the paper's network and schedule (for a GPU).

The paper's CIFAR-10 network (Liu et al. 2016, Table 1):

    [3×3,64], [3×3,64]×4 pool, [3×3,96]×4 pool, [3×3,128]×4 pool,
    FC 256, BN, PReLU, then the head

with BN and PReLU after every conv, and its schedule: SGD with momentum 0.9,
weight decay 5e-4, batch 256, learning rate 0.1 divided by 10 at 12k and
15k iterations, 18k iterations in all. λ follows the authors' released
CIFAR-10 setting, InverseDecay(base=1000, gamma=2e-5, power=45, minimum=0),
or the CIFAR-10+ one (gamma=1e-5) with `--augment` (4-pixel padding, random
32×32 crop, horizontal flip). The head is `LSoftmaxDense(10, margin=m)`
(default m = 4, the paper's best), or a bias-free `Dense` for `--margin 0`.
The paper reports test errors of 9.05% (softmax) and 7.73 / 7.66 / 7.58%
(m = 2 / 3 / 4) on CIFAR-10, and 6.50 / 6.01 / 5.94 / 5.92% on CIFAR-10+.

    python examples/cifar10.py --margin 4 --out out/cifar10_m4
    python examples/cifar10.py --augment --margin 4 --out out/cifar10plus_m4

Data: `keras.datasets.cifar10.load_data()` by default (it downloads), or
`--data PATH`, an .npz with x_train (N, 32, 32, 3) uint8, y_train, x_test,
y_test. Outputs (in --out): `results.json` and the trained model,
`model.keras`. `--validation` trains on 45k images and reports the error on
the other 5k (the paper's split for choosing the schedule). On a CPU this
network takes hours; `--smoke` runs a few hundred images for one epoch.
"""

from __future__ import annotations

import argparse
import json
import os

import keras
import tensorflow as tf

import common
import keras_lsoftmax

GROUPS = [(64, 4), (96, 4), (128, 4)]
ITERATIONS = 18000
GAMMA = {False: 2e-5, True: 1e-5}  # CIFAR-10, CIFAR-10+ (authors' files)
POWER = 45.0


def build_model(margin: int, decay: float) -> keras_lsoftmax.Model:
    inputs = keras.Input((32, 32, 3))
    x = common.conv_bn_prelu(inputs, 64, 3, decay)  # conv0
    x = common.conv_stack(x, GROUPS, decay)
    features = common.fc_features(x, 256, decay)
    logits = common.head(10, margin, decay)(features)
    return keras_lsoftmax.Model(inputs, logits, name=f"cifar10_m{margin}")


def training_data(x, y, batch_size: int, augment: bool, seed: int):
    """A shuffled, batched tf.data pipeline, with the CIFAR-10+ augmentation
    (pad 4, random 32×32 crop, horizontal flip) if `augment`."""
    data = tf.data.Dataset.from_tensor_slices((x, y))
    data = data.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    if augment:

        def transform(image, label):
            image = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
            image = tf.image.random_crop(image, (32, 32, 3))
            return tf.image.random_flip_left_right(image), label

        data = data.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.example_parser(__doc__, "cifar10", "cifar10")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed (default: %(default)s)")
    parser.add_argument("--margin", type=int, default=4,
                        help="0: plain softmax (bias-free Dense); m ≥ 1: "
                        "LSoftmaxDense(margin=m) (default: %(default)s)")
    parser.add_argument("--augment", action="store_true",
                        help="CIFAR-10+: pad-4 random crops and flips, and "
                        "the authors' CIFAR-10+ λ gamma (1e-5) (default: off)")
    parser.add_argument("--iterations", type=int, default=ITERATIONS,
                        help="training steps, rounded up to whole epochs "
                        "(default: %(default)s)")
    common.add_sgd_args(parser)
    parser.add_argument("--lambda-gamma", type=float, default=None,
                        help="gamma of InverseDecay(1000, gamma, 45) "
                        "(default: 2e-5, or 1e-5 with --augment)")
    parser.add_argument("--lambda-min", type=float, default=0.0,
                        help="floor of λ; the authors advise 0.5 if training "
                        "diverges late (default: %(default)s)")
    common.add_validation_arg(parser)
    parser.add_argument("--mixed-precision", action="store_true",
                        help="mixed_float16 policy (GPU); the L-Softmax head "
                        "computes in float32 anyway (default: off, float32)")
    args = parser.parse_args(argv)
    if args.margin < 0:
        parser.error("--margin must be 0 (softmax) or a positive integer")
    if args.lambda_gamma is None:
        args.lambda_gamma = GAMMA[args.augment]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    train, test = common.load_cifar10(args.data)
    split = common.split_name(args)
    train, test, (epochs, total_steps), out = common.prepare_run(
        args, train, test, 1
    )

    common.seed_everything(args.seed)
    model = build_model(args.margin, args.weight_decay)
    lr = common.step_learning_rate(
        total_steps, args.learning_rate, args.lr_drops
    )
    common.compile_classifier(model, common.sgd(lr))
    schedule = keras_lsoftmax.schedules.InverseDecay(
        base=common.AUTHORS_BASE,
        gamma=args.lambda_gamma,
        power=POWER,
        minimum=args.lambda_min,
    )
    print(
        f"{common.margin_name(args.margin)} on CIFAR-10"
        f"{'+' if args.augment else ''}: {len(train[1])} training images, "
        f"{epochs} epoch(s) = {total_steps} steps; λ {schedule}"
    )
    data = training_data(
        train[0], train[1], args.batch_size, args.augment, args.seed
    )
    with common.Timer() as timer:
        history = model.fit(
            data,
            epochs=epochs,
            shuffle=False,  # the tf.data pipeline shuffles
            validation_data=(test[0], test[1]) if args.validation else None,
            callbacks=[
                *common.lambda_callbacks(args.margin, schedule),
                common.Progress(epochs).run(common.margin_name(args.margin)),
            ],
            verbose=args.verbose,
        )
    accuracy = model.evaluate(
        test[0], test[1], batch_size=500, verbose=args.verbose,
        return_dict=True,
    )["accuracy"]
    model_path = os.path.join(out, "model.keras")
    model.save(model_path)
    result = {
        "command": common.command_line("cifar10.py", argv),
        "head": common.margin_name(args.margin),
        "dataset": "CIFAR-10+" if args.augment else "CIFAR-10",
        "split": split,
        "error_percent": 100.0 * (1.0 - float(accuracy)),
        "epochs": epochs,
        "steps": total_steps,
        "train_seconds": timer.seconds,
        "lambda_schedule": schedule.get_config(),
        "final_lambda": history.history.get("lsoftmax_lambda", [None])[-1],
        "model": model_path,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    print(
        f"\n{result['head']}: {split} error {result['error_percent']:.2f}% "
        f"after {total_steps} steps ({timer.seconds / 60:.1f} min); "
        f"saved {model_path}"
    )
    return result


if __name__ == "__main__":
    main()
