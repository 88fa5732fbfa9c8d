"""Base of the CAMs that perturb a layer's output (Ablation-CAM,
Recipro-CAM): prefix caching, with the recording pass also giving the
activations, and one output of a layer with several perturbed at a time."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

from captum._utils.typing import TargetType
from torch import Tensor

from captum_ssl.attr._cam.base import _LayerActivationCam
from captum_ssl.attr._core import resolve_layout
from captum_ssl.attr._prefix import (
    Perturb,
    _Recording,
    layer_output_scores,
    record_layer,
)


class _LayerOutputPerturbation(_LayerActivationCam):
    """Use before the other bases of a layer-output perturbation CAM.

    ``prefix_cache`` (class attribute, settable per instance): compute the
    network up to the layer once per image (:mod:`captum_ssl.attr._prefix`);
    False re-runs the whole model for every perturbation (same result).

    On a layer with several outputs, the map of output ``i`` perturbs output
    ``i`` only (:meth:`_each_output` says which); the others keep the values
    the model computes, as when the explained layer is the submodule that
    produces output ``i`` alone.
    """

    prefix_cache = True
    _recording: Union[_Recording, str, None] = None

    def _activations(
        self,
        inputs: Tuple[Tensor, ...],
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        target: TargetType = None,
    ) -> Tuple[Tensor, ...]:
        self._recording = None
        if self.prefix_cache and not attribute_to_layer_input:
            rec = record_layer(
                self.forward_func, self.layer, inputs, target, additional_forward_args
            )
            self._recording = rec
            outs = rec.layer_out if isinstance(rec, _Recording) else None
            outs = (outs,) if isinstance(outs, Tensor) else outs
            if isinstance(outs, tuple) and all(isinstance(t, Tensor) for t in outs):
                layout = resolve_layout(
                    self.forward_func, self.layer, inputs, self.layout
                )
                return tuple(layout.to_grid(t) for t in outs)
        return super()._activations(
            inputs, additional_forward_args, attribute_to_layer_input, target
        )

    def _each_output(
        self, acts: Tuple[Tensor, ...], method: Callable[[Tensor], Tensor]
    ) -> Tuple[Tensor, ...]:
        """As the base's; the recording (kept for every output's scores) is
        released at the end of the call."""
        try:
            return super()._each_output(acts, method)
        finally:
            self._recording = None

    def _output_scores(
        self,
        inputs: Tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        n_per_sample: int,
        perturb: Perturb,
        perturbations_per_eval: Optional[int],
        show_progress: bool,
        desc: str,
        output_transform: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """:func:`layer_output_scores` of the output :meth:`_each_output` is
        at, reusing the activations' recording."""
        return layer_output_scores(
            self.forward_func,
            self.layer,
            inputs,
            target,
            additional_forward_args,
            n_per_sample,
            perturb,
            perturbations_per_eval,
            show_progress,
            desc,
            prefix_cache=self.prefix_cache,
            output_transform=output_transform,
            recording=self._recording,
            output_index=self._output_index,
        )
