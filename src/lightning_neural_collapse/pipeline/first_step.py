"""The checks of a fit's first training step, made before its first optimizer step.

Once per fit, after the first training forward (in ``on_before_backward``, or at the end of a step that
has no backward), :class:`FirstStep`:

1. checks an automatically found classifier with :class:`~lightning_neural_collapse.pipeline.probe.FinalLayerProbe`:
   an error if a layer with weights runs on its output; a switch to the ``nn.Linear`` that feeds the
   classification loss when the automatic choice (the last ``nn.Linear``) is a projection or auxiliary
   head; a warning when several heads feed the loss and nothing tells them apart;
2. learns ``C`` and ``D`` from the captured logits and features (and checks them against ``num_classes=``);
3. validates the first batch's labels on the host (the only host-device synchronisation of the per-step
   path, once per fit) and, in exact mode, that the model input can be read from it.

Every error names the option to set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_neural_collapse.pipeline.capture import Binding
from lightning_neural_collapse.pipeline.labels import BatchFormatError, ClassCountError, LabelReader, needs_layout
from lightning_neural_collapse.pipeline.probe import FinalLayerProbe


@dataclass(frozen=True)
class Shapes:
    """What the first forward tells: ``num_classes`` (``C``, logits per sample), ``dim`` (``D``) and whether every
    position of a sequence is a sample (``tokens``)."""

    num_classes: int
    dim: int
    tokens: bool = False


class FirstStep:
    """Runs the first-step checks of one fit.

    Raises:
        MisconfigurationException: at construction, when ``num_classes`` disagrees with the classifier's
            ``out_features``.

    Args:
        binding: the classifier binding (its capture holds the first forward's tensors).
        num_classes: the ``num_classes=`` option, or ``None``.
        label_getter: the ``label_getter=`` option, or ``None``.
        ignore_index: the ``ignore_index=`` option.
        input_getter: in exact mode, the function that reads the model input from a batch; else ``None``.
        probe: whether to watch the step with a :class:`FinalLayerProbe` (automatic, uncompiled classifiers).
        warn: ``(key, message) -> None``, for warnings once per fit.
        shift_labels: for token samples, whether the target of position ``t`` is ``labels[:, t + 1]``.
        shift_reason: why (said in an info message when the model turns out to give token samples).
    """

    def __init__(
        self,
        binding: Binding,
        *,
        num_classes: int | None,
        label_getter: Callable[[Any], Any] | None,
        ignore_index: int | None,
        input_getter: Callable[[Any], Any] | None,
        probe: bool,
        warn: Callable[[str, str], None],
        shift_labels: bool = False,
        shift_reason: str = "",
    ) -> None:
        self.binding = binding
        self.shift_labels = shift_labels
        self.shift_reason = shift_reason
        self.num_classes_option = num_classes
        self.label_getter = label_getter
        self.ignore_index = ignore_index
        self.input_getter = input_getter
        self.warn = warn
        self.probe = FinalLayerProbe(binding.model, binding.module) if probe and binding.automatic else None
        self.batch: Any = None
        self.labels_checked = False
        declared = getattr(binding.module, "out_features", None)
        if num_classes is not None and isinstance(declared, int) and declared != num_classes:
            raise MisconfigurationException(
                f"`num_classes={num_classes}` but the classifier `{binding.name}` has {declared} outputs; set "
                "`num_classes=` to match, or `classifier=` to the layer that produces the logits."
            )

    @property
    def expected_classes(self) -> int | None:
        """``C`` before the first forward: ``num_classes=``, else the classifier's ``out_features``, else ``None``."""
        declared = getattr(self.binding.module, "out_features", None)
        return self.num_classes_option or (declared if isinstance(declared, int) else None)

    def begin(self, batch: Any) -> None:
        """Start watching the step of ``batch``."""
        self.batch = batch
        if self.probe is not None:
            self.probe.start()
        try:
            self._check_labels(
                self.expected_classes, early=True
            )  # known from the option or the layer: before the forward
        except ClassCountError:
            if self.probe is None:
                raise  # else the probe may find that another layer is the classifier: checked after the forward

    def finish(self, loss: Any = None) -> Shapes | None:
        """The checks after the forward; returns the shapes, or ``None`` when the classifier did not run.

        Raises:
            MisconfigurationException, BatchFormatError: naming the option to set.
        """
        try:
            self._check_classifier(loss)
        finally:
            if self.probe is not None:
                self.probe.stop()
            self.probe = None
        captured = self.binding.peek()
        if captured is None:
            return None
        shapes = self._shapes(captured.features.shape[1], captured.num_classes, captured.layout is not None)
        if shapes.tokens:
            rank_zero_info(
                f"NeuralCollapseCallback: `{self.binding.name}` gives one output per position of a {captured.layout} "
                f"(batch, positions) sequence: every position is a sample (a token). shift_labels={self.shift_labels} "
                f"({self.shift_reason})."
            )
        self._check_labels(shapes.num_classes, captured.layout)
        self.batch = None
        return shapes

    def _check_classifier(self, loss: Any) -> None:
        probe = self.probe
        if probe is None:
            return
        name = self.binding.name
        if probe.consumers:
            after = probe.consumers[-1]
            raise MisconfigurationException(
                f"NeuralCollapseCallback found `{name}` ({type(self.binding.module).__name__}) as the classifier, "
                f"but `{after}` runs on its output in the training step, so its output is not the logits. Set "
                f"`classifier='{after}'` (and `features=` if the penultimate features are not that layer's input); "
                f"if `{name}` is the classifier after all, set `classifier='{name}'`."
            )
        on_path = probe.reaches_loss(loss)
        if on_path is None:  # the classifier's output has no graph (no_grad, checkpointing): nothing to tell
            return
        heads = probe.logit_heads(loss)
        if len(heads) == 1 and heads[0] != name and heads[0] in probe.linear_io:
            self._switch(heads[0], f"its output feeds the classification loss, not that of `{name}`")
            return
        others = probe.other_heads(loss)
        if on_path is False and len(others) == 1 and others[0] in probe.linear_io:
            self._switch(others[0], f"`{name}`'s output does not reach the loss")
            return
        if others and name not in heads:
            self.warn(
                "other-heads",
                f"NeuralCollapseCallback took `{name}` as the classifier (the last nn.Linear), but "
                f"{', '.join(f'`{n}`' for n in others)} also feed(s) the loss (auxiliary or projection heads?). "
                "If the logits come from another layer, set `classifier=` to it; set "
                f"`classifier='{name}'` to confirm this choice and silence this warning.",
            )

    def _switch(self, name: str, reason: str) -> None:
        assert self.probe is not None
        old = self.binding.name
        features, logits = self.probe.linear_io[name]
        if self.binding.features_module is not None:  # the features module's output of this step stays
            features = self.binding.capture.features if self.binding.capture.features is not None else features
        self.binding.rebind(name)
        self.binding.capture.set(features, logits)
        rank_zero_info(
            f"NeuralCollapseCallback: using `{name}` as the classifier, not `{old}` (the last nn.Linear): "
            f"{reason}, so `{old}` is taken for a projection or auxiliary head. Set `classifier=` to choose."
        )

    def _shapes(self, dim: int, num_classes: int, tokens: bool) -> Shapes:
        name = self.binding.name
        option = self.num_classes_option
        if option is not None and num_classes != option:
            raise MisconfigurationException(
                f"the classifier `{name}` outputs {num_classes} values per sample but `num_classes={option}`; set "
                "`classifier=` to the layer producing the logits."
            )
        if num_classes < 2:
            raise MisconfigurationException(
                f"the classifier `{name}` outputs {num_classes} value(s) per sample; Neural Collapse needs a "
                "multi-class classifier. Set `classifier=` to the layer producing the logits."
            )
        return Shapes(num_classes=num_classes, dim=dim, tokens=tokens)

    def _check_labels(
        self, num_classes: int | None, layout: tuple[int, int] | None = None, *, early: bool = False
    ) -> None:
        if num_classes is None or self.labels_checked or self.batch is None:
            return
        reader = LabelReader(self.label_getter, num_classes, self.ignore_index, shift=self.shift_labels)
        try:
            targets = reader.getter(self.batch)
            if early and needs_layout(targets):
                return  # (batch, positions) labels: a sequence model's, checked once its output is known
            reader.check(self.batch, layout, targets)
        except ClassCountError as err:  # say where the number of classes comes from
            option = self.num_classes_option is not None
            source = "`num_classes`" if option else f"the outputs of `{self.binding.name}`"
            hint = "" if option else " If that layer is not the one producing the logits, set `classifier=`."
            message = f"NeuralCollapseCallback ({num_classes} classes from {source}): {err}{hint}"
            raise ClassCountError(message) from None
        except BatchFormatError as err:
            raise BatchFormatError(f"NeuralCollapseCallback: {err}") from None
        if self.input_getter is not None:
            self.input_getter(self.batch)
        self.labels_checked = True
