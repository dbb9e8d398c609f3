"""The large-margin family beyond L-Softmax: SphereFace, CosFace, ArcFace.

Each head is a `keras_lsoftmax.MarginDense` that states its formula: which
of x and w are normalised, the scale, and the margin φ of the target cosine
(`keras_lsoftmax.margins`). Training, labels, λ, saving, export and the
backends work as for `keras_lsoftmax.LSoftmaxDense`.

Margins are in the units of the papers and of insightface: SphereFace's m
is an integer multiplier of θ, CosFace's m a cosine, ArcFace's m radians
(pytorch-metric-learning's `ArcFaceLoss` takes degrees: its default 28.6°
is the 0.5 rad here).
"""

from typing import Any

import keras

from keras_lsoftmax.layers import LSoftmaxDense
from keras_lsoftmax.layers import MarginDense
from keras_lsoftmax.margins import ArcMargin
from keras_lsoftmax.margins import CosineMargin


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
class SphereFaceDense(LSoftmaxDense):
    """A-Softmax (SphereFace): the L-Softmax margin on unit class weights.

    The plain logits are ‖x‖cos θ_j (class weights normalised, features
    not); in training the labelled one becomes
    ‖x‖·(λ·cos θ_y + ψ(θ_y)) / (1 + λ), with the ψ of
    `keras_lsoftmax.LSoftmaxDense`. λ anneals by default as for
    `LSoftmaxDense`, from about 1000 over the first 30% of the run, to the
    floor of 5 that the SphereFace authors keep (a smaller λ behaves like a
    much smaller margin or does not train; their own schedule,
    `keras_lsoftmax.schedules.InverseDecay(1000, 0.12, 1, minimum=5)`, is
    one `lambda_schedule=` away).

    Args:
        units: positive int, the number of classes C.
        margin: positive int m (default 4, as in the paper).
        lambda_schedule: `"auto"` (default), a float ≥ 0 or a
            `keras_lsoftmax.schedules.LambdaSchedule`, as for
            `keras_lsoftmax.MarginDense`.
        lambda_minimum: float ≥ 0 or None, the floor of the `"auto"`
            schedule (None: 5).
        kernel_initializer: initializer for the kernel, called with the
            Dense shape (input_dim, units).
        kernel_regularizer: regularizer for the kernel (units, input_dim).
        kernel_constraint: constraint for the kernel (units, input_dim).
        **kwargs: `sample_rate` and `seed` (Partial-FC class sampling, as
            for `keras_lsoftmax.MarginDense`) and the other
            `keras.layers.Layer` arguments.

    Call arguments:
        inputs: float tensor (B, D), the features.
        labels: optional labels, as for `keras_lsoftmax.MarginDense`.
        training: bool. The margin applies only when True and labels are
            known.

    Returns:
        Logits of shape (B, units).

    Example:

    ```python
    head = keras_lsoftmax.SphereFaceDense(10, margin=4)
    ```

    Reference:
        Liu, Wen, Yu, Li, Raj, Song, "SphereFace: Deep Hypersphere Embedding
        for Face Recognition", CVPR 2017, https://arxiv.org/abs/1704.08063
    """

    def __init__(
        self,
        units: int,
        margin: int = 4,
        lambda_schedule: Any = "auto",
        lambda_minimum: float | None = None,
        kernel_initializer: Any = "glorot_uniform",
        kernel_regularizer: Any = None,
        kernel_constraint: Any = None,
        **kwargs: Any,
    ):
        super().__init__(
            units,
            margin=margin,
            normalize_weights=True,
            lambda_schedule=lambda_schedule,
            lambda_minimum=lambda_minimum,
            kernel_initializer=kernel_initializer,
            kernel_regularizer=kernel_regularizer,
            kernel_constraint=kernel_constraint,
            **kwargs,
        )

    def default_lambda_minimum(self) -> float:
        """The floor of the `"auto"` schedule without `lambda_minimum`: 5."""
        return 5.0

    def _formula_config(self) -> dict[str, Any]:
        return {"margin": self.margin}


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
class CosFaceDense(MarginDense):
    """AM-Softmax (CosFace): an additive cosine margin on the hypersphere.

    Features and class weights are normalised; the plain logits are
    s·cos θ_j, and in training the labelled one becomes s·(cos θ_y − m).

    Args:
        units: positive int, the number of classes C.
        margin: float ≥ 0, m (default 0.35, the CosFace paper's for faces).
        scale: float > 0, s (default 64, the papers' value for faces;
            pytorch-metric-learning users report better results with 8 to
            30 on small datasets).
        lambda_schedule: λ blends the margin logit with the plain one as in
            `keras_lsoftmax.MarginDense`; default 0 (the CosFace logit).
        kernel_initializer: initializer for the kernel, called with the
            Dense shape (input_dim, units).
        kernel_regularizer: regularizer for the kernel (units, input_dim).
        kernel_constraint: constraint for the kernel (units, input_dim).
        **kwargs: `sample_rate` and `seed` (Partial-FC class sampling, as
            for `keras_lsoftmax.MarginDense`) and the other
            `keras.layers.Layer` arguments.

    Call arguments:
        inputs: float tensor (B, D), the features.
        labels: optional labels, as for `keras_lsoftmax.MarginDense`.
        training: bool. The margin applies only when True and labels are
            known.

    Returns:
        Logits of shape (B, units): s·cos θ_j at inference.

    Example:

    ```python
    head = keras_lsoftmax.CosFaceDense(10, margin=0.35, scale=30.0)
    ```

    Reference:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face
        Recognition", CVPR 2018, https://arxiv.org/abs/1801.09414
    """

    def __init__(
        self,
        units: int,
        margin: float = 0.35,
        scale: float = 64.0,
        lambda_schedule: Any = 0.0,
        kernel_initializer: Any = "glorot_uniform",
        kernel_regularizer: Any = None,
        kernel_constraint: Any = None,
        **kwargs: Any,
    ):
        super().__init__(
            units,
            target_margin=CosineMargin(margin),
            scale=scale,
            normalize_weights=True,
            lambda_schedule=lambda_schedule,
            kernel_initializer=kernel_initializer,
            kernel_regularizer=kernel_regularizer,
            kernel_constraint=kernel_constraint,
            **kwargs,
        )
        self.margin = self.target_margin.m

    def _formula_config(self) -> dict[str, Any]:
        return {"margin": self.margin, "scale": self.scale}


@keras.saving.register_keras_serializable(package="keras_lsoftmax")
class ArcFaceDense(MarginDense):
    """ArcFace: an additive angular margin, optionally with sub-centres.

    Features and class weights are normalised; the plain logits are
    s·cos θ_j, and in training the labelled one becomes s·cos(θ_y + m).
    Where θ_y + m > π, where cos(θ_y + m) would rise again, it is
    s·(cos θ_y − m·sin m) instead, as in insightface and
    pytorch-metric-learning. With `sub_centers=K` (sub-centre ArcFace, for
    noisy labels) each class keeps K weights: its logit is the largest of
    their cosines, and the margin applies to the closest sub-centre of the
    labelled class.

    The margin is in radians, as in the ArcFace paper and insightface;
    pytorch-metric-learning's `ArcFaceLoss(margin=28.6)` is in degrees and
    equals `margin=0.5` here.

    Args:
        units: positive int, the number of classes C.
        margin: float in [0, π), m in radians (default 0.5).
        scale: float > 0, s (default 64, the papers' value for faces;
            pytorch-metric-learning users report better results with 8 to
            30 on small datasets).
        sub_centers: positive int K (default 1); the paper uses 3.
        lambda_schedule: λ blends the margin logit with the plain one as in
            `keras_lsoftmax.MarginDense`; default 0 (the ArcFace logit).
        kernel_initializer: initializer for the kernel, called with the
            Dense shape (input_dim, units · sub_centers).
        kernel_regularizer: regularizer for the kernel
            (units · sub_centers, input_dim).
        kernel_constraint: constraint for the kernel
            (units · sub_centers, input_dim).
        **kwargs: `sample_rate` and `seed` (Partial-FC class sampling, as
            for `keras_lsoftmax.MarginDense`) and the other
            `keras.layers.Layer` arguments.

    Call arguments:
        inputs: float tensor (B, D), the features.
        labels: optional labels, as for `keras_lsoftmax.MarginDense`.
        training: bool. The margin applies only when True and labels are
            known.

    Returns:
        Logits of shape (B, units): s·cos θ_j at inference.

    Example:

    ```python
    head = keras_lsoftmax.ArcFaceDense(10, margin=0.5, scale=30.0)
    ```

    Reference:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss
        for Deep Face Recognition", CVPR 2019,
        https://arxiv.org/abs/1801.07698; Deng et al., "Sub-center ArcFace",
        ECCV 2020 for `sub_centers`.
    """

    def __init__(
        self,
        units: int,
        margin: float = 0.5,
        scale: float = 64.0,
        sub_centers: int = 1,
        lambda_schedule: Any = 0.0,
        kernel_initializer: Any = "glorot_uniform",
        kernel_regularizer: Any = None,
        kernel_constraint: Any = None,
        **kwargs: Any,
    ):
        super().__init__(
            units,
            target_margin=ArcMargin(margin),
            scale=scale,
            normalize_weights=True,
            sub_centers=sub_centers,
            lambda_schedule=lambda_schedule,
            kernel_initializer=kernel_initializer,
            kernel_regularizer=kernel_regularizer,
            kernel_constraint=kernel_constraint,
            **kwargs,
        )
        self.margin = self.target_margin.m

    def _formula_config(self) -> dict[str, Any]:
        return {
            "margin": self.margin,
            "scale": self.scale,
            "sub_centers": self.sub_centers,
        }


__all__ = ["ArcFaceDense", "CosFaceDense", "SphereFaceDense"]
