"""Mixin of the CAMs that perturb a layer's output (Ablation-CAM,
Recipro-CAM): prefix caching, with the recording pass also giving the
activations."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

from captum._utils.typing import TargetType
from torch import Tensor

from captum_ssl.attr._core import resolve_layout
from captum_ssl.attr._prefix import Perturb, layer_output_scores, record_layer


class _LayerOutputPerturbation:
    """Use before :class:`_LayerActivationCam` in the bases.

    ``prefix_cache`` (class attribute, settable per instance): compute the
    network up to the layer once per image (:mod:`captum_ssl.attr._prefix`);
    False re-runs the whole model for every perturbation (same result).
    """

    prefix_cache = True
    _recording: Any = None

    def _activations(
        self,
        inputs: Tuple[Tensor, ...],
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        target: TargetType = None,
    ) -> Tensor:
        self._recording = None
        if self.prefix_cache and not attribute_to_layer_input:
            rec = record_layer(
                self.forward_func,  # type: ignore[attr-defined]
                self.layer,  # type: ignore[attr-defined]
                inputs,
                target,
                additional_forward_args,
            )
            self._recording = rec
            if not isinstance(rec, str) and isinstance(rec.layer_out, Tensor):
                layout = resolve_layout(
                    self.forward_func,  # type: ignore[attr-defined]
                    self.layer,  # type: ignore[attr-defined]
                    inputs,
                    self.layout,  # type: ignore[attr-defined]
                )
                return layout.to_grid(rec.layer_out)
        return super()._activations(  # type: ignore[misc]
            inputs, additional_forward_args, attribute_to_layer_input, target
        )

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
        """:func:`layer_output_scores`, reusing the activations' recording."""
        rec, self._recording = self._recording, None
        return layer_output_scores(
            self.forward_func,  # type: ignore[attr-defined]
            self.layer,  # type: ignore[attr-defined]
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
            recording=rec,
        )
