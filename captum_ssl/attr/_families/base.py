"""The interface of a family adapter and the registry that finds one.

A *family* is one implementation of Vision Transformer attention (timm's
``Attention``, timm EVA, timm BEiT, ``torch.nn.MultiheadAttention`` in
torchvision and open_clip, ...). Its adapter is the only code that knows it:

* which attention modules it has, in execution order, under the names they
  have in the user's model (:meth:`FamilyAdapter.attention_sites`);
* its token layout: prefix tokens (class / distillation / register) and the
  patch grid for an input size (:meth:`FamilyAdapter.layout`);
* what its head reads (:meth:`FamilyAdapter.class_token_unread`);
* its attention and block forwards, written in the primitives of
  :class:`~captum_ssl.attr._lrp.propagate.Propagator`
  (:data:`ATTENTION` for capture, :meth:`FamilyAdapter.plan` for LRP).

The methods and the rules never ask which family a model is. Adding a family
is one file: an :func:`attention_impl` registration per attention class and a
:func:`register`-ed adapter.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Callable,
    ClassVar,
    Dict,
    Iterator,
    List,
    Optional,
    Tuple,
    Type,
    cast,
)

from torch import Tensor, nn

from captum_ssl.attr._core import AttributionInputError
from captum_ssl.attr._layout import TokenLayout, root_module

if TYPE_CHECKING:
    from captum_ssl.attr._lrp.propagate import Plan, Propagator

#: kinds of attention: over tokens, class token only, over channels (XCiT)
SELF, CLASS, CHANNEL = "self", "class", "channel"


@dataclass(frozen=True)
class AttentionImpl:
    """How one attention class computes: its kind and its forward in the
    Propagator primitives (``forward(P, module) -> callable``), a drop-in
    replacement of ``module.forward`` that calls ``P.attend``."""

    kind: str
    forward: Callable[[Propagator, nn.Module], Callable]
    label: str


#: (loader of the attention class, its implementation); loaders import lazily
#: so that an optional package (open_clip, torchvision) is needed only when
#: its models are used
_IMPLS: List[Tuple[Callable[[], Optional[type]], AttentionImpl]] = []
_CLASSES: Dict[type, AttentionImpl] = {}


def register_attention(loader: Callable[[], Optional[type]], impl: AttentionImpl):
    """Register an attention class (returned by ``loader``; it raises
    ImportError if its package is not installed, and may return ``None`` while
    the package is not imported yet, to be asked again) with its
    implementation."""
    _IMPLS.append((loader, impl))


def _impls() -> Dict[type, AttentionImpl]:
    waiting = []
    while _IMPLS:
        loader, impl = _IMPLS.pop(0)
        try:
            cls = loader()
        except ImportError:
            continue  # the package is not installed
        if cls is not None:
            _CLASSES[cls] = impl
        else:  # a package that is not imported yet: asked again next time
            waiting.append((loader, impl))
    _IMPLS.extend(waiting)
    return _CLASSES


def attention_impl(module: nn.Module) -> Optional[AttentionImpl]:
    """The registered implementation of ``module``'s class, or ``None``."""
    impls = _impls()
    found = impls.get(type(module))
    if found is not None:
        return found
    for cls, impl in impls.items():
        if isinstance(module, cls):
            return impl
    return None


def attention_labels() -> List[str]:
    return [impl.label for impl in _impls().values()]


@dataclass(frozen=True)
class Site:
    """One attention module of a model."""

    name: str  # qualified name in the model, e.g. "blocks.3.attn"
    module: nn.Module
    kind: str


class FamilyAdapter:
    """What the methods may ask about a model of one family.

    Subclasses set :attr:`label`, implement :meth:`matches` and whatever of
    the rest differs from the defaults (which read timm's conventions).
    """

    #: shown in "supported" lists, e.g. "timm EVA / EVA02"
    label: ClassVar[str] = ""
    #: whether LRP has rules for the family (otherwise ``lrp_unsupported``)
    has_lrp: ClassVar[bool] = True
    #: fallback adapters match by content (any supported attention module)
    #: and are tried only after every adapter that matches the model itself
    fallback: ClassVar[bool] = False

    def __init__(self, model: nn.Module, prefix: str = "") -> None:
        self.model = model
        #: where ``model`` sits in the module the user passed (``"backbone."``
        #: when another adapter wraps this one), for layer names in messages
        self.prefix = prefix

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------ structure
    def attention_sites(self) -> List[Site]:
        """Every supported attention module, in execution order."""
        sites = []
        for name, m in self.model.named_modules():
            impl = attention_impl(m)
            if impl is not None:
                sites.append(Site(name, m, impl.kind))
        return sites

    def name_of(self, module: nn.Module) -> str:
        """``module``'s qualified name in the model (for messages)."""
        for name, m in self.model.named_modules():
            if m is module:
                return name
        return type(module).__name__

    def block_of(self, attention: nn.Module) -> Optional[nn.Module]:
        """The block (encoder layer) whose output follows ``attention``, read
        by LeGrad; ``None``: the module that holds ``attention`` (every family
        but those whose attention sits one module deeper)."""
        return None

    def norm_layer(self) -> Optional[str]:
        """The dotted path (relative to :attr:`model`, e.g.
        ``"vit.layers.-1.layernorm_before"``) of the norm before the last
        block's attention, the CAM layer; ``None`` where the family does not
        name one."""
        return None

    def norm_layer_hint(self) -> str:
        """A layer for the CAMs (named as in the user's model)."""
        sites = self.attention_sites()
        if not sites:
            return "a late block's norm layer"
        block = sites[-1].name.rsplit(".", 1)[0]
        return f"the norm before `{block}`'s attention"

    # ---------------------------------------------------------------- tokens
    def layout(self, input_hw: Optional[Tuple[int, int]]) -> Optional[TokenLayout]:
        """The declared token layout (``fmt="NLC"``, prefix tokens, patch grid
        for an input of ``input_hw``), or ``None`` when it declares none."""
        return None

    def token_roles(self) -> Dict[str, int]:
        """Indices of the named prefix tokens, e.g. ``{"cls": 0, "dist": 1}``."""
        return {"cls": 0}

    def class_token_unread(self) -> Optional[str]:
        """Why the head never reads the class token (e.g. it averages the
        patch tokens), or ``None`` when it reads it."""
        return None

    def class_row_unread(self) -> Optional[str]:
        """Why the class token's row (of attention or its relevance) explains
        nothing the model outputs: the model has no class token, or its head
        never reads it (:meth:`class_token_unread`); ``None`` when it does.
        The one reason the attention methods, the LRP methods and the main
        job give."""
        if "cls" not in self.token_roles():
            return f"{type(self.model).__name__} has no class token"
        why = self.class_token_unread()
        return None if why is None else f"{why}: its head never reads the class token"

    # ----------------------------------------------------------------- heads
    def score_projection(self) -> Callable[[Tensor], Tensor]:
        """Class logits of intermediate tokens ``(B, N, C)`` (LeGrad): the
        mean token through the final norm and the classifier."""
        model = self.model
        norm, head = getattr(model, "norm", None), getattr(model, "head", None)
        if not isinstance(norm, nn.Module) or not isinstance(head, nn.Module):
            raise AttributionInputError(
                f"{type(model).__name__} has no `norm` and `head` to score "
                "intermediate tokens: pass score_projection=<function (B, N, C) "
                "tokens -> (B, classes) logits>."
            )
        fc_norm = getattr(model, "fc_norm", None) or nn.Identity()
        head_drop = getattr(model, "head_drop", None) or nn.Identity()
        return lambda z: head(head_drop(fc_norm(norm(z.mean(dim=1)))))

    # ------------------------------------------------------------------- LRP
    def lrp_unsupported(self) -> Optional[str]:
        """Why LRP does not apply to this model (an error message), or None."""
        if not self.has_lrp:
            return (
                f"LRP has no rules for {type(self.model).__name__}. Supported: "
                f"{lrp_supported()}. Use the attention methods or the CAMs."
            )
        return None

    def plan(self, P: Propagator, embedding: bool) -> Plan:
        """(module, forward) pairs that route the whole model through ``P``;
        ``embedding`` adds the rules below the first block."""
        raise NotImplementedError

    def patch_tokens(self) -> nn.Module:
        """The module whose output are the patch tokens (AttnLRP at
        ``"patches"``), before any prefix token or position embedding."""
        return cast(nn.Module, self.model.patch_embed)

    def hooks(self, P: Propagator) -> list:
        """Hook handles to add for one LRP call (removed afterwards)."""
        return []

    def call_plan(self) -> Plan:
        """(module, forward) pairs installed for every attribution call on the
        model, whatever the method (CAMs included; see :func:`family_call`),
        where the model's own forward would not give a token map (ViT-MAE's
        embeddings shuffle the patches). Default: none."""
        return []


class WrapperAdapter(FamilyAdapter):
    """The adapter of a module that wraps a model of another family (whose
    adapter is :attr:`inner`) and computes its output after it: tokens,
    blocks and the per-call set-up are the inner family's; a subclass adds
    what the wrapper computes (``score_projection``, ``plan``) and overrides
    what else differs."""

    inner: FamilyAdapter

    def block_of(self, attention: nn.Module) -> Optional[nn.Module]:
        return self.inner.block_of(attention)

    def layout(self, input_hw: Optional[Tuple[int, int]]) -> Optional[TokenLayout]:
        return self.inner.layout(input_hw)

    def token_roles(self) -> Dict[str, int]:
        return self.inner.token_roles()

    def class_token_unread(self) -> Optional[str]:
        return self.inner.class_token_unread()

    def patch_tokens(self) -> nn.Module:
        return self.inner.patch_tokens()

    def hooks(self, P: Propagator) -> list:
        return self.inner.hooks(P)

    def call_plan(self) -> Plan:
        return self.inner.call_plan()


def loaded_class(module: str, name: str) -> Optional[type]:
    """Class ``name`` of ``module`` if that module is imported already (a
    model of an optional package can only exist once its package is; this
    never imports open_clip or torchvision just to look)."""
    mod = sys.modules.get(module)
    return None if mod is None else getattr(mod, name, None)


_ADAPTERS: List[Type[FamilyAdapter]] = []


def register(cls: Type[FamilyAdapter]) -> Type[FamilyAdapter]:
    """Class decorator: add a family adapter to the registry."""
    _ADAPTERS.append(cls)
    return cls


def families() -> List[Type[FamilyAdapter]]:
    return list(_ADAPTERS)


def lrp_supported() -> str:
    return "; ".join(a.label for a in _ADAPTERS if a.has_lrp)


def find_adapter(forward_func: Callable) -> Optional[FamilyAdapter]:
    """The adapter of the model behind ``forward_func`` (the model, a bound
    method of it, or a wrapper around it: the outermost submodule that an
    adapter claims), or ``None``."""
    root = root_module(forward_func)
    if root is None:
        return None
    exact = [a for a in _ADAPTERS if not a.fallback]
    for module in root.modules():
        for cls in exact:
            if cls.matches(module):
                return cls(module)
    for cls in _ADAPTERS:
        if cls.fallback and cls.matches(root):
            return cls(root)
    return None


def adapter_for(forward_func: Callable) -> FamilyAdapter:
    """:func:`find_adapter`, or an error naming the supported families."""
    found = find_adapter(forward_func)
    if found is not None:
        return found
    root = root_module(forward_func)
    if root is None:
        raise AttributionInputError(
            "The Vision Transformer methods need forward_func to be the model (an "
            "nn.Module) or one of its bound methods, so that its attention modules "
            "can be found."
        )
    for module in root.modules():
        if "swin" in type(module).__name__.lower():
            raise AttributionInputError(
                f"{type(module).__name__}'s shifted-window attention attends within "
                "local windows (with a relative position bias) and merges patches "
                "between stages: there is no class token and no global "
                "token-to-token attention map, so the attention methods and LRP are "
                "undefined for it. Use the CAMs on a late stage's norm layer, e.g. "
                "LayerGradCam(model, model.layers[-1].blocks[-1].norm1)."
            )
    raise AttributionInputError(
        f"{type(root).__name__} has no supported attention module. Supported: "
        f"{supported()}. For CNNs (and as an alternative on ViTs) use the CAMs "
        "(e.g. LayerGradCam on a late block's norm layer)."
    )


def lrp_adapter(forward_func: Callable) -> FamilyAdapter:
    """The adapter of ``forward_func``'s model if LRP applies to it, else an
    error saying why. LRP routes every operation through its rules, so the
    adapter's model must be the module that computes the output: a wrapper
    around it (a probe head, a pooling, ``clip.encode_image``) is refused."""
    root = root_module(forward_func)
    adapter = adapter_for(forward_func)
    why = adapter.lrp_unsupported()
    if why is None and adapter.model is not root:
        inner = type(adapter.model).__name__
        named = () if root is None else root.named_modules()
        where = next((n for n, m in named if m is adapter.model), inner)
        why = (
            f"LRP routes every operation of the model through its rules, but "
            f"{type(root).__name__} wraps the {inner} at `{where}` and computes "
            "its output with operations that have no rule. Pass the "
            f"{inner} itself, or use the attention methods, LeGrad or the CAMs "
            "on the wrapper."
        )
    if why is not None:
        raise AttributionInputError(why)
    return adapter


@contextlib.contextmanager
def family_call(forward_func: Callable) -> Iterator[None]:
    """The scope of one attribution call: ``forward_func``'s model runs with
    its family's :meth:`FamilyAdapter.call_plan` installed, removed on exit
    (also when the block raises). A no-op for every model whose family needs
    none (only a model that holds a module of such a family is searched for
    its adapter: the search is cheap for every other model)."""
    root = root_module(forward_func)
    planners = [a for a in _ADAPTERS if a.call_plan is not FamilyAdapter.call_plan]
    adapter = None
    if root is not None and any(a.matches(m) for m in root.modules() for a in planners):
        adapter = find_adapter(forward_func)
    plan = [] if adapter is None else adapter.call_plan()
    if not plan:
        yield
        return
    from captum_ssl.attr._lrp.propagate import installed

    with installed(plan):
        yield


def supported() -> str:
    return "; ".join(a.label for a in _ADAPTERS)


def declared_layout(
    model: nn.Module, input_hw: Optional[Tuple[int, int]]
) -> Optional[TokenLayout]:
    """The token layout ``model``'s family declares for an input of
    ``input_hw``, or ``None`` (the hook :mod:`captum_ssl.attr._layout` asks)."""
    adapter = find_adapter(model)
    return None if adapter is None else adapter.layout(input_hw)
