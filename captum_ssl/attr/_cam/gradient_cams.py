"""Gradient-based CAMs: each states only its weighting of the activations."""

from __future__ import annotations

import torch
from torch import Tensor

from captum_ssl.attr._cam.base import (
    LayerGradCam,
    documented,
    first_principal_projection,
    require_positions,
    warn_if_channel_sum_vanishes,
)
from captum_ssl.attr._layout import spatial_reduce


@documented
class LayerGradCamPlusPlus(LayerGradCam):
    r"""Grad-CAM++: pixel-wise weighting of positive gradients.

    .. math:: \alpha^{kc}_{ij} = \frac{(\partial_{ij} y^c)^2}
              {2(\partial_{ij} y^c)^2 + \sum_{ab} A^k_{ab}(\partial_{ij} y^c)^3},
              \quad w^c_k = \sum_{ij} \alpha^{kc}_{ij}\,
              \mathrm{relu}(\partial_{ij} y^c)

    with the exponential-output simplification of the paper's Eq. 19 (the
    same as pytorch-grad-cam), :math:`\alpha = 0` where the gradient is 0.

    Reference: Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based
    Visual Explanations for Deep Convolutional Networks", WACV 2018.
    https://arxiv.org/abs/1710.11063

    {gradient_cam_args}

    Examples::

        >>> cam = LayerGradCamPlusPlus(model, model.layer4)
        >>> attr = cam.attribute(images, target=[281, 285])   # (2, 1, 7, 7)
    """

    eps = 1e-6

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        g2 = grads.pow(2)
        g3 = g2 * grads
        sum_acts = spatial_reduce(acts, "sum")
        alpha = g2 / (2 * g2 + sum_acts * g3 + self.eps)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        return spatial_reduce(alpha * torch.relu(grads), "sum")


@documented
class LayerXGradCam(LayerGradCam):
    r"""XGrad-CAM: gradients weighted by normalised activations.

    .. math:: w^c_k = \sum_{ij} \frac{A^k_{ij}}{\sum_{ab} A^k_{ab}}
              \frac{\partial y^c}{\partial A^k_{ij}}

    Reference: Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization
    and Explanation of CNNs", BMVC 2020. https://arxiv.org/abs/2008.02312

    {gradient_cam_args}

    Examples::

        >>> attr = LayerXGradCam(model, model.layer4).attribute(images, target=3)
    """

    eps = 1e-7

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        sum_acts = spatial_reduce(acts, "sum")
        return spatial_reduce(grads * acts / (sum_acts + self.eps), "sum")


@documented
class LayerHiResCam(LayerGradCam):
    r"""HiRes-CAM: element-wise gradient x activation, summed over channels.

    .. math:: L^c = \sum_k \frac{\partial y^c}{\partial A^k} \odot A^k

    Unlike Grad-CAM it does not average the gradients over positions, so the
    map provably reflects the locations the model used.

    On a layer whose output feeds a per-position LayerNorm (Swin's
    ``layers[-1]``, ConvNeXt's ``stages[0..2]``) the channel sum is exactly
    zero at every position (LayerNorm's gradient is orthogonal to its input):
    a warning names a layer that works.

    Reference: Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful
    explanations of convolutional neural networks", 2020.
    https://arxiv.org/abs/2011.08891

    {gradient_cam_args}

    Examples::

        >>> attr = LayerHiResCam(model, model.layer4).attribute(images, target=3)
    """

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        return grads

    def _combine(self, acts: Tensor, grads: Tensor, sum_channels: bool) -> Tensor:
        if sum_channels:
            warn_if_channel_sum_vanishes(
                self.forward_func, self.layer, acts, grads, type(self).__name__
            )
        return super()._combine(acts, grads, sum_channels)


@documented
class LayerGradCamElementWise(LayerGradCam):
    r"""Element-wise Grad-CAM: ReLU of gradient x activation, summed.

    .. math:: L^c = \sum_k \mathrm{relu}\Big(\frac{\partial y^c}{\partial A^k}
              \odot A^k\Big)

    The variant of pytorch-grad-cam's ``GradCAMElementWise`` (HiRes-CAM with
    the ReLU applied per element before the channel sum).

    Reference: after Draelos & Carin 2020 (https://arxiv.org/abs/2011.08891);
    pytorch-grad-cam's ``GradCAMElementWise``.

    {gradient_cam_args}

    Examples::

        >>> attr = LayerGradCamElementWise(model, model.layer4).attribute(x, target=3)
    """

    def _combine(self, acts: Tensor, grads: Tensor, sum_channels: bool) -> Tensor:
        elementwise = torch.relu(grads * acts)
        return elementwise.sum(dim=1, keepdim=True) if sum_channels else elementwise


@documented
class LayerLayerCam(LayerGradCam):
    r"""Layer-CAM: activations weighted by their positive gradients, per position.

    .. math:: L^c = \sum_k \mathrm{relu}\Big(\frac{\partial y^c}{\partial A^k}
              \Big) \odot A^k

    Reference: Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation
    Maps for Localization", IEEE TIP 2021.
    https://doi.org/10.1109/TIP.2021.3089943

    {gradient_cam_args}

    Examples::

        >>> attr = LayerLayerCam(model, model.layer3).attribute(images, target=3)
    """

    def _weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        return torch.relu(grads)


@documented
class LayerEigenGradCam(LayerGradCam):
    r"""Eigen-Grad-CAM: first principal component of gradient x activation.

    Projects :math:`\partial y^c / \partial A \odot A` (positions x channels,
    centred per channel) on its first right-singular vector.

    Deliberate deviation from pytorch-grad-cam: the SVD's sign is arbitrary and
    pytorch-grad-cam keeps whatever sign LAPACK returns, so its map can come
    out inverted. Here the projection is oriented to correlate positively with
    the HiRes-CAM map :math:`\sum_k \partial y^c / \partial A^k \odot A^k`;
    where that sum vanishes (a layer feeding a per-position LayerNorm, see
    :class:`LayerHiResCam`) the orientation is arbitrary and a warning says so.

    Reference: after Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using
    Principal Components", IJCNN 2020 (https://arxiv.org/abs/2008.00299);
    pytorch-grad-cam's ``EigenGradCAM``.

    {gradient_cam_args}
    ``attr_dim_summation`` must stay True: a principal component has no
    per-channel form.

    Examples::

        >>> attr = LayerEigenGradCam(model, model.layer4).attribute(x, target=3)
    """

    def _combine(self, acts: Tensor, grads: Tensor, sum_channels: bool) -> Tensor:
        if not sum_channels:
            raise ValueError(
                "LayerEigenGradCam has no per-channel form: use "
                "attr_dim_summation=True."
            )
        require_positions(acts, "LayerEigenGradCam")
        warn_if_channel_sum_vanishes(
            self.forward_func, self.layer, acts, grads, type(self).__name__
        )
        product = grads * acts
        return first_principal_projection(product, product.sum(dim=1, keepdim=True))
