"""Deep Feature Factorization: concepts shared across a batch, by NMF of a
layer's activations, with the classifier's scores for each concept."""

from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import torch
from captum._utils.typing import TargetType
from captum.log import log_usage
from torch import Tensor, nn

from captum_ssl.attr._cam.activation_cams import _find_classifier
from captum_ssl.attr._cam.base import _finish, _LayerActivationCam
from captum_ssl.attr._core import (
    AttributionInputError,
    TensorOrTuple,
    attribution_call,
    check_target,
    draw,
    format_inputs,
    per_sample_targets,
    working_dtype,
)
from captum_ssl.attr._layout import TokenLayout, spatial_shape

#: the NMF's default sweep limit and stopping tolerance (``nmf``, ``factorize``
#: and ``attribute``)
NMF_MAX_ITER = 200
NMF_TOL = 1e-4


def _cd_sweep(w: Tensor, hht: Tensor, xht: Tensor) -> Tensor:
    """One cyclic coordinate-descent sweep over the columns of ``w`` (in place)
    for ``min ||X - W H||^2, W >= 0``; returns the projected-gradient norm.

    Rows of ``w`` are independent given ``H``, so each column is updated for
    all rows at once; columns are updated one after the other (each sees the
    columns already updated), which is the cyclic coordinate descent of
    Cichocki & Phan (2009)."""
    violation = w.new_zeros(())
    for t in range(w.shape[1]):
        grad = w @ hht[:, t] - xht[:, t]
        pg = torch.where(w[:, t] == 0, grad.clamp(max=0), grad)
        violation = violation + pg.abs().sum()
        hess = hht[t, t]
        if hess != 0:
            w[:, t] = (w[:, t] - grad / hess).clamp(min=0)
    return violation


def nmf(
    x: Tensor,
    n_components: int,
    init: Optional[Tuple[Tensor, Tensor]] = None,
    max_iter: int = NMF_MAX_ITER,
    tol: float = NMF_TOL,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Non-negative matrix factorisation ``x ~ W H`` by coordinate descent.

    Alternates one sweep over ``W`` and one over ``H`` until the summed
    projected-gradient magnitude falls below ``tol`` times its first value,
    or ``max_iter`` sweeps (the stopping rule of scikit-learn's ``cd``
    solver). The random initialisation draws ``|N(0, 1)| * sqrt(mean(x) / k)``.

    Args:
        x (Tensor): non-negative ``(n, m)``.
        n_components (int): ``k``.
        init (tuple[Tensor, Tensor], optional): starting ``(W (n, k), H (k,
                    m))``; ``None`` draws them with ``generator``.
        max_iter (int, optional): Default: 200
        tol (float, optional): Default: 1e-4
        generator (torch.Generator, optional): on any device (the draws are
                    made there and moved to ``x``'s).

    Returns:
        tuple[Tensor, Tensor]: ``W (n, k)``, ``H (k, m)``.
    """
    n, m = x.shape
    if init is None:
        avg = torch.sqrt(x.mean() / n_components)
        h = avg * draw(torch.randn, (n_components, m), generator, x).abs()
        w = avg * draw(torch.randn, (n, n_components), generator, x).abs()
    else:
        w = init[0].to(x.device, x.dtype).clone()
        h = init[1].to(x.device, x.dtype).clone()
        if w.shape != (n, n_components) or h.shape != (n_components, m):
            raise AttributionInputError(
                f"init must be W {(n, n_components)} and H {(n_components, m)}; "
                f"got {tuple(w.shape)} and {tuple(h.shape)}."
            )
    ht = h.t().contiguous()
    first = None
    for _ in range(max_iter):
        violation = _cd_sweep(w, ht.t() @ ht, x @ ht)
        violation = violation + _cd_sweep(ht, w.t() @ w, x.t() @ w)
        if first is None:
            first = violation
        if first == 0 or violation / first <= tol:
            break
    return w, ht.t()


class Factorization(NamedTuple):
    """Result of :meth:`DeepFeatureFactorization.factorize`.

    ``concepts``: ``(C, k)`` concept embeddings in the layer's channel space;
    ``maps``: ``(B, k, h, w)`` where each concept is present (not normalised);
    ``scores``: ``(k, num_classes)`` the classifier's outputs on the concept
    embeddings, or ``None`` without a classifier."""

    concepts: Tensor
    maps: Tensor
    scores: Optional[Tensor]


class DeepFeatureFactorization(_LayerActivationCam):
    r"""Deep Feature Factorization (DFF): concepts shared by a batch of images.

    The activations of all images, as a matrix channels x (images . positions),
    shifted per channel to be non-negative (minus the channel's minimum), are
    factorised by NMF into ``k`` concepts: :math:`A - a_{min} \approx W H`.
    Column :math:`j` of :math:`W` (plus the shift) is concept :math:`j`'s
    embedding, row :math:`j` of :math:`H` its map in every image. Applying the
    classifier to the embeddings labels the concepts with class scores.

    Differences from Captum's layer methods, and why: the method describes a
    batch, not one output, so :meth:`factorize` returns all concepts, their
    maps ``(B, k, h, w)`` and their class scores; :meth:`attribute` gives the
    Captum-style ``(B, 1, h, w)`` map per target: the map of the concept the
    classifier (softmax over classes) rates most likely to be the sample's
    target class. The NMF runs in torch (coordinate descent, the
    scikit-learn ``cd`` solver's updates and stopping rule) on the input's
    device; ``init`` reproduces a given starting point.

    Reference: Collins, Achanta & Süsstrunk, "Deep Feature Factorization for
    Concept Discovery", ECCV 2018. https://arxiv.org/abs/1806.10206

    Args:
        forward_func (Callable): the model or any function returning scores.
        layer (torch.nn.Module): the layer whose activations are factorised.
        device_ids (list[int], optional): for DataParallel models.
        layout (TokenLayout, optional): token / channels-last layout.
        classifier (Callable, optional): maps concept embeddings ``(k, C)`` to
                    class scores ``(k, num_classes)``; ``None`` finds the
                    model's linear classifier (``get_classifier()``, ``fc``,
                    ``classifier``, ``head``) when its input size is ``C``.

    Examples::

        >>> dff = DeepFeatureFactorization(model, model.layer4)
        >>> concepts, maps, scores = dff.factorize(images, n_components=5)
        >>> maps.shape, scores.shape          # (B, 5, 7, 7), (5, 1000)
        >>> attr = dff.attribute(images, target=[281, 285])   # (B, 1, 7, 7)
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        device_ids: Optional[List[int]] = None,
        layout: Optional[TokenLayout] = None,
        classifier: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        super().__init__(forward_func, layer, device_ids, layout)
        self.classifier = classifier

    def _classifier(self, channels: int) -> Optional[Callable[[Tensor], Tensor]]:
        if self.classifier is not None:
            return self.classifier
        try:
            fc = _find_classifier(self.forward_func)
        except AttributionInputError:
            return None
        return fc if fc.in_features == channels else None

    def factorize(
        self,
        inputs: TensorOrTuple,
        n_components: int = 16,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        init: Optional[Tuple[Tensor, Tensor]] = None,
        max_iter: int = NMF_MAX_ITER,
        tol: float = NMF_TOL,
        generator: Optional[torch.Generator] = None,
        output: int = 0,
    ) -> Factorization:
        r"""Concepts of the batch, their maps and class scores.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): input batch.
            n_components (int, optional): number of concepts ``k``.
                        Default: 16
            additional_forward_args (Any, optional): extra forward arguments.
            attribute_to_layer_input (bool, optional): use the layer's input.
            init (tuple[Tensor, Tensor], optional): NMF start ``(W (C, k),
                        H (k, B*h*w))``. Default: None (random)
            max_iter (int, optional): most NMF sweeps. Default: 200
            tol (float, optional): NMF stopping rule, relative to the first
                        sweep's projected gradient. Default: 1e-4
            generator (torch.Generator, optional): for the random start.
            output (int, optional): which output of a layer with several
                        (input, with ``attribute_to_layer_input``) to
                        factorise. Default: 0

        Returns:
            Factorization: ``concepts (C, k)``, ``maps (B, k, h, w)``,
            ``scores (k, num_classes)`` or ``None``.
        """
        if n_components < 1:
            raise AttributionInputError("n_components must be >= 1.")
        formatted = format_inputs(inputs, False, self.forward_func)
        acts = self._activations(
            formatted, additional_forward_args, attribute_to_layer_input
        )
        if not -len(acts) <= output < len(acts):
            raise AttributionInputError(
                f"output={output}: the layer has {len(acts)} output tensor(s); "
                f"use an index in [0, {len(acts) - 1}]."
            )
        return self._factorize(
            acts[output], n_components, init, max_iter, tol, generator
        )

    def _factorize(
        self,
        acts: Tensor,
        n_components: int,
        init: Optional[Tuple[Tensor, Tensor]],
        max_iter: int,
        tol: float,
        generator: Optional[torch.Generator],
    ) -> Factorization:
        """:meth:`factorize` of one output's activations ``(B, C, *spatial)``."""
        b, c = acts.shape[:2]
        spatial = spatial_shape(acts)
        # NMF's alternating updates drift in bfloat16 / float16
        x = torch.nan_to_num(acts.transpose(0, 1).reshape(c, -1))
        x = x.to(working_dtype(x.dtype))
        offset = x.min(dim=1, keepdim=True).values
        weights, comps = nmf(x - offset, n_components, init, max_iter, tol, generator)
        concepts = weights + offset
        maps = comps.reshape(n_components, b, *spatial).transpose(0, 1)
        clf = self._classifier(c)
        scores = None
        if clf is not None:
            with torch.no_grad():
                scores = clf(concepts.t().contiguous().to(acts.dtype))
                scores = scores.to(concepts.dtype)
        return Factorization(concepts, maps, scores)

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        n_components: int = 16,
        generator: Optional[torch.Generator] = None,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): input batch.
            target (int, Tensor or list): class per sample (required).
            additional_forward_args (Any, optional): extra forward arguments.
            attribute_to_layer_input (bool, optional): use the layer's input.
            relu_attributions (bool, optional): ReLU the map. Default: False
            n_components (int, optional): number of concepts. Default: 16
            generator (torch.Generator, optional): for the NMF's random start.

        Returns:
            Tensor or tuple[Tensor, ...]: ``(B, 1, *spatial)``: per sample,
            the map of the concept whose class scores give the target the
            highest probability; a tuple for a layer with several outputs
            (each output factorised on its own, one map per output).
        """
        if target is None:
            raise AttributionInputError(
                "DeepFeatureFactorization.attribute needs target=<class index> "
                "(one, or one per sample); factorize() returns all concepts."
            )
        if n_components < 1:
            raise AttributionInputError("n_components must be >= 1.")
        formatted = format_inputs(inputs, False, self.forward_func)
        with attribution_call(self.forward_func) as record:
            acts = self._activations(
                formatted, additional_forward_args, attribute_to_layer_input
            )

            def concept_map(a: Tensor) -> Tensor:
                fact = self._factorize(
                    a, n_components, None, NMF_MAX_ITER, NMF_TOL, generator
                )
                return self._target_concept(fact, target)

            cams = self._each_output(acts, concept_map)
            return _finish(cams, relu_attributions, len(cams) > 1, record)

    def _target_concept(self, fact: Factorization, target: TargetType) -> Tensor:
        """Per sample, the map ``(B, 1, *spatial)`` of the concept whose class
        scores give ``target`` the highest probability."""
        if fact.scores is None:
            raise AttributionInputError(
                "No classifier matches the layer's channels: pass classifier=<a "
                "callable (k, C) -> (k, num_classes)> to label the concepts."
            )
        batch = fact.maps.shape[0]
        # the target indexes the classifier's classes (checked as Captum)
        check_target(fact.scores.new_empty(batch, fact.scores.shape[1]), target)
        classes = torch.as_tensor(
            [
                int(t[0] if isinstance(t, tuple) else t)
                for t in per_sample_targets(target, batch)
            ],
            device=fact.scores.device,
        )
        prob = torch.softmax(fact.scores, dim=1)  # (k, classes)
        best = prob[:, classes].argmax(dim=0).to(fact.maps.device)  # (B,)
        return fact.maps[torch.arange(batch, device=best.device), best][:, None]
