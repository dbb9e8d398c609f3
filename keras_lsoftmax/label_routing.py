"""Which labels each `LSoftmaxDense` of a model gets in `fit` and `evaluate`.

The rule, as Keras matches losses to outputs:

- `y` a single array or tensor: every head gets it.
- `y` a list, tuple or dict: a head call whose output is a model output
  gets the labels of that output (by position for lists and tuples, by
  output name for dicts); a head call whose output is not a model output
  (nested deeper, or followed by other layers) gets the labels only if `y`
  holds one label tensor, and otherwise raises an error naming the head.

The rule holds per call: a head shared by several outputs gets, in each
call, the labels of the output that call gives. Which call gives which
output is found by tracing the forward pass once in a scratch graph, so
this works for Sequential, functional and subclassed models alike; the
trace is cached per model and input structure. The step's forward pass
calls the heads in the order of the trace.
"""

import weakref
from typing import Any

import keras

from keras_lsoftmax.backend import tracing
from keras_lsoftmax.label_scope import current_graph
from keras_lsoftmax.label_scope import label_scope

# model -> {input structure: {id(head): [output path or None per call]}}
_HEAD_PATHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_label_scope(
    model: keras.Model, x: Any, y: Any, step: Any = None
) -> label_scope:
    """The `label_scope` that hands `y` to the heads of `model` on `x`.

    `step` is the optimizer step of this training step (see `label_scope`).
    """
    routes = {}
    if keras.tree.is_nested(y):
        paths, outputs = _head_paths(model, x)
        names = getattr(model, "output_names", None)
        for head_id, call_paths in paths.items():
            routes[head_id] = [
                _route(y, model.loss, path, outputs, names)
                for path in call_paths
            ]
    leaf = _only_leaf(y)
    fallback = None if leaf is None else (leaf, _ignore_class(model.loss))
    return _RoutedLabelScope(model, y, routes, fallback, step)


def _route(
    y: Any, loss: Any, path: tuple | None, outputs: Any, names: Any
) -> tuple[Any, int | None] | None:
    """The labels and ignored class for the output at `path`, or None."""
    if path is None:
        return None
    labels = _select(y, path, outputs, names)
    if labels is None:
        return None
    return labels, _ignore_class(_select(loss, path, outputs, names))


class _RoutedLabelScope(label_scope):
    """A `label_scope` whose labels depend on the head and the call."""

    # The test step's labels are those of the batch, so evaluation calls
    # take them too (for the θ that `evaluate` logs).
    inference_labels = True

    def __init__(
        self,
        model: keras.Model,
        y: Any,
        routes: dict[int, list[tuple[Any, int | None] | None]],
        fallback: tuple[Any, int | None] | None,
        step: Any,
    ):
        super().__init__(y, step=step)
        self._model = model
        self._routes = routes
        self._fallback = fallback
        self._calls: dict[tuple, int] = {}

    def labels_for(self, layer: Any, inputs: Any) -> tuple[Any, int | None]:
        # Counted per graph: a call Keras traces in a scratch graph of its
        # own is not one of the step's calls.
        key = (current_graph(), id(layer))
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        routes = self._routes.get(id(layer), [])
        route = routes[call] if call < len(routes) else None
        route = self._fallback if route is None else route
        if route is None:
            raise ValueError(
                f"Cannot tell which labels LSoftmaxDense '{layer.name}' "
                f"should use in its call number {call + 1} of the forward "
                "pass: that call does not give an output of model "
                f"'{self._model.name}' (or its output has no labels in `y`), "
                f"and `y` holds labels for {len(_leaves(self.labels))} "
                "outputs. "
                "Make the head's output a model output (each call of the "
                "head then gets the labels of its output), or train in your "
                "own loop and call the head with `labels=...` or inside "
                "`keras_lsoftmax.label_scope(labels)`."
            )
        return route


def _leaves(structure: Any) -> list:
    return [leaf for leaf in keras.tree.flatten(structure) if leaf is not None]


def _only_leaf(structure: Any) -> Any:
    """The one non-None leaf of `structure`, or None if it has several."""
    leaves = _leaves(structure)
    return leaves[0] if len(leaves) == 1 else None


class _HeadProbe(label_scope):
    """Records which head gives which output, with placeholder labels."""

    def __init__(self):
        # A placeholder step too: on JAX the optimizer's counter is empty
        # while `fit` runs, and the trace needs no λ value.
        super().__init__(labels=(), step=0)

    def labels_for(self, layer: Any, inputs: Any) -> tuple[Any, int | None]:
        rows = keras.ops.shape(inputs)[0]
        return keras.ops.zeros((rows,), "int32"), None


def _head_paths(model: keras.Model, x: Any) -> tuple[dict, Any]:
    """Where the output of each head call lies in y_pred.

    Returns `({id(head): [y_pred path of each call's output, or None]},
    y_pred's structure)`.
    """
    key = repr(keras.tree.map_structure(_spec_key, x))
    cache = _HEAD_PATHS.setdefault(model, {})
    if key not in cache:
        found: list = []

        def probe(x):
            with _HeadProbe() as scope:
                y_pred = model(x, training=True)
            found.append(_output_paths(scope.records, y_pred))
            return keras.ops.zeros(())

        # Traced for its structure only: the step's own trace, the model's
        # state and its random generators are left untouched.
        tracing.trace_only(probe, x, model.variables)
        cache[key] = found[0]
    return cache[key]


def _output_paths(records: list, y_pred: Any) -> tuple[dict, Any]:
    leaves = keras.tree.flatten_with_path(y_pred)
    paths: dict[int, list] = {}
    for record in records:
        path = next(
            (path for path, leaf in leaves if leaf is record.outputs), None
        )
        paths.setdefault(id(record.layer), []).append(path)
    return paths, keras.tree.map_structure(lambda _: None, y_pred)


def _spec_key(t: Any) -> Any:
    if t is None:
        return None
    return (tuple(t.shape), str(t.dtype))


def _select(structure: Any, path: tuple, outputs: Any, names: Any) -> Any:
    """The leaf of `structure` (labels or losses) for the output at `path`.

    `structure` is matched to the model outputs `outputs` the way Keras
    matches `y` and `loss`: a dict by output names when the outputs are not
    a dict, a one-element list or tuple to a single output.
    """
    if isinstance(structure, dict) and not isinstance(outputs, dict):
        structure = _by_output_names(structure, outputs, names)
    if (
        isinstance(structure, (list, tuple))
        and len(structure) == 1
        and not keras.tree.is_nested(outputs)
    ):
        structure = structure[0]
    for key in path:
        try:
            structure = structure[key]
        except (KeyError, IndexError, TypeError):
            return None
    return None if keras.tree.is_nested(structure) else structure


def _by_output_names(structure: dict, outputs: Any, names: Any) -> Any:
    if keras.tree.is_nested(outputs):
        if names and len(names) == len(outputs):
            return [structure.get(name) for name in names]
        return structure
    if names and len(names) == 1 and names[0] in structure:
        return structure[names[0]]
    if len(structure) == 1:
        return next(iter(structure.values()))
    return structure


def _ignore_class(loss: Any) -> int | None:
    """The `ignore_class` of a compiled loss, if it has one."""
    if keras.tree.is_nested(loss):
        loss = _only_leaf(loss)
    if not isinstance(loss, keras.losses.Loss):
        return None  # a name or a function: no ignored class
    ignore_class = loss.get_config().get("ignore_class")
    return ignore_class if isinstance(ignore_class, int) else None
