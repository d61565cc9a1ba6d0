"""Prompts through the frozen CLIP text encoder: the CLIP-ReID prompt learner and the PromptSG composer.

Both build on one piece of machinery, :func:`layout_prompt`: fill a template, tokenise it **once** with
the backbone's tokenizer, and find the placeholder positions and the EOT position *from the tokens*
(never by assuming 4 context words or a fixed slice: docs/mistakes.md #6). The text feature is always read
at the EOT position (``ClipBackbone.encode_text_embeddings``), never at position 0 (docs/mistakes.md #5).

:class:`PromptLearner` (CLIP-ReID stage 1)::

    learner = PromptLearner(backbone, num_classes=72, n_ctx=4, aspect="dorsal_r")
    learner.prompt_text            # 'A photo of a X X X X dorsal right hand.'
    text = learner(labels)         # [B, D]; gradients reach learner.ctx only
    all_text = learner.all_text_features()   # [num_classes, D], no_grad (stage 2)
    ckpt = learner.state_for_checkpoint()    # {"meta": {...}, "state_dict": {...}}
    learner2 = PromptLearner.from_checkpoint(ckpt, backbone, num_classes=72)

:class:`PromptComposer` (PromptSG)::

    composer = PromptComposer(backbone, aspect="dorsal_r")   # 'A photo of a X dorsal right hand.'
    text = composer(pseudo_words)          # pseudo_words [B, width] -> [B, D], grads reach them
    fixed = composer.simplified_text_feature()   # 'A photo of a dorsal right hand.' -> [1, D]

The backbone is **not** a submodule of either module: ``parameters()`` / ``state_dict()`` hold only the
prompt's own tensors (``ctx`` and the fixed token-embedding buffers), so ``Adam(learner.parameters())``
trains the context and nothing else, and a checkpoint does not duplicate the backbone. The caller owns
the backbone: it freezes it (``backbone.requires_grad_(False)``) and moves it to the device together
with the prompt module (``learner.to(device)`` moves ``ctx`` and the buffers, not the backbone).
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..constants import ASPECT_NAMES, HD_ASPECT
from .backbones import ClipBackbone

import clip.clip  # already imported, warning-free, by .backbones above

__all__ = [
    "DEFAULT_TEMPLATE",
    "COMPOSER_TEMPLATE",
    "SIMPLIFIED_TEMPLATE",
    "ASPECT_PHRASES",
    "PROMPT_CHECKPOINT_FORMAT",
    "aspect_phrase",
    "PromptLayout",
    "layout_prompt",
    "check_compatible",
    "PromptLearner",
    "PromptComposer",
]

#: CLIP-ReID's "A photo of a X X X X person." for hands; ``{ctx}`` becomes ``n_ctx`` placeholder words.
DEFAULT_TEMPLATE = "A photo of a {ctx} {aspect} hand."
#: PromptSG: ``{token}`` becomes ONE placeholder word replaced by the image's pseudo-word S*.
COMPOSER_TEMPLATE = "A photo of a {token} {aspect} hand."
#: PromptSG's simplified inference prompt (plain tokens, no pseudo-word).
SIMPLIFIED_TEMPLATE = "A photo of a {aspect} hand."
#: Format tag of :meth:`PromptLearner.state_for_checkpoint`.
PROMPT_CHECKPOINT_FORMAT = "handclip_nb.prompt_learner/1"

#: Workbench aspect names -> the words used in prompts.
ASPECT_PHRASES: dict[str, str] = {**{short: phrase for phrase, short in ASPECT_NAMES.items()}, HD_ASPECT: HD_ASPECT}


def aspect_phrase(aspect: str) -> str:
    """``"dorsal_r"`` -> ``"dorsal right"`` (also accepts the phrase itself, any case / spacing)."""
    if isinstance(aspect, str):
        key = aspect.strip().lower()
        if key in ASPECT_PHRASES:
            return ASPECT_PHRASES[key]
        phrase = " ".join(key.split())
        if phrase in ASPECT_PHRASES.values():
            return phrase
    valid = ", ".join(f"{k} ({v!r})" for k, v in ASPECT_PHRASES.items())
    raise ValueError(f"unknown hand aspect {aspect!r}; valid: {valid}")


# --------------------------------------------------------------------------------------------------
# Shared tokenisation machinery
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptLayout:
    """A filled template, its tokens and where the placeholder words and EOT ended up."""

    template: str
    text: str  # the filled prompt, e.g. 'A photo of a X X X X dorsal right hand.'
    tokens: torch.Tensor  # [1, context_length] token ids (on the backbone's device)
    slot: slice  # positions of the placeholder words in ``tokens``
    eot_index: int  # position of the EOT token (tokens.argmax())
    placeholder: str
    placeholder_id: int

    @property
    def n_slot(self) -> int:
        return self.slot.stop - self.slot.start


def _template_fields(template: str) -> list[str]:
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise ValueError(f"malformed prompt template {template!r}: {exc}") from None


def _placeholder_id(backbone: ClipBackbone, placeholder: str) -> int:
    """Token id of ``placeholder``; it must be one word that tokenises to exactly one token."""
    if not isinstance(placeholder, str) or len(placeholder.split()) != 1:
        raise ValueError(f"placeholder must be a single word, got {placeholder!r}")
    tok = backbone.tokenize(placeholder)[0]
    n = int((tok != 0).sum()) - 2  # minus SOT and EOT
    if n != 1:
        raise ValueError(f"placeholder {placeholder!r} tokenises to {n} tokens; choose a word that is one "
                         f"token (e.g. 'X' or '*')")
    return int(tok[1])


def _runs(ids: Sequence[int], value: int) -> list[tuple[int, int]]:
    """Maximal runs ``(start, length)`` of ``value`` in ``ids``."""
    runs, start = [], None
    for i, v in enumerate(list(ids) + [None]):
        if v == value and start is None:
            start = i
        elif v != value and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def layout_prompt(
    backbone: ClipBackbone,
    template: str,
    *,
    slot: str,
    n_slot: int,
    aspect: Optional[str] = None,
    placeholder: str = "X",
) -> PromptLayout:
    """Fill ``template``'s ``{slot}`` with ``n_slot`` placeholder words and ``{aspect}`` with its phrase,
    tokenise once, and locate the placeholders and EOT from the tokens.

    Errors (ValueError) for: a template without exactly one ``{slot}``, unknown fields, ``n_slot < 1``,
    a filled prompt longer than the backbone's context length (the message says how many tokens it
    needs), and placeholders that cannot be located (e.g. a literal placeholder word next to the slot).
    """
    if not isinstance(n_slot, int) or isinstance(n_slot, bool) or n_slot < 1:
        raise ValueError(f"the number of {{{slot}}} placeholder tokens must be an integer >= 1, got {n_slot!r}")
    fields = _template_fields(template)
    if fields.count(slot) != 1:
        where = "lacks" if slot not in fields else f"has {fields.count(slot)} of"
        raise ValueError(f"prompt template {template!r} {where} the placeholder {{{slot}}}; it needs exactly "
                         f"one, e.g. {(DEFAULT_TEMPLATE if slot == 'ctx' else COMPOSER_TEMPLATE)!r}")
    unknown = sorted(set(fields) - {slot, "aspect"})
    if unknown:
        raise ValueError(f"prompt template {template!r} has unknown field(s) "
                         f"{', '.join('{' + f + '}' for f in unknown)}; allowed: {{{slot}}}, {{aspect}}")
    fill: dict[str, str] = {slot: " ".join([placeholder] * n_slot)}
    if "aspect" in fields:
        if aspect is None:
            raise ValueError(f"prompt template {template!r} has {{aspect}} but no aspect was given")
        fill["aspect"] = aspect_phrase(aspect)
    pid = _placeholder_id(backbone, placeholder)
    text = template.format(**fill)

    # Length check before tokenising (clip.tokenize would raise a RuntimeError without the count).
    needed = len(clip.clip._tokenizer.encode(text)) + 2  # + start and end tokens
    length = backbone.context_length
    if needed > length:
        raise ValueError(
            f"prompt {text!r} needs {needed} tokens (incl. start/end), but the text encoder of "
            f"{backbone.name!r} has a context length of {length}: use at most {n_slot - (needed - length)} "
            f"placeholder tokens or a shorter template"
        )
    tokens = backbone.tokenize(text)  # [1, L]: the one tokenisation everything below reads
    ids = tokens[0].tolist()
    eot = int(tokens[0].argmax())
    eot_id = clip.clip._tokenizer.encoder["<|endoftext|>"]
    if ids[eot] != eot_id:  # cannot happen with CLIP's vocabulary; guards a foreign tokenizer
        raise ValueError(f"EOT token of {text!r} not found (argmax id {ids[eot]} != {eot_id})")

    candidates = [s for s, n in _runs(ids[:eot], pid) if n == n_slot]
    if len(candidates) > 1:  # the placeholder word also occurs elsewhere in the template: the slot's
        # run starts after the tokens of the text before it (SOT + its BPE tokens)
        before = template.split("{" + slot + "}")[0].format(**{k: v for k, v in fill.items() if k != slot})
        expected = 1 + len(clip.clip._tokenizer.encode(before))
        candidates = [s for s in candidates if s == expected]
    if len(candidates) != 1:
        raise ValueError(
            f"cannot locate the {n_slot} placeholder token(s) {placeholder!r} (id {pid}) of {{{slot}}} in "
            f"{text!r} (runs of that id: {_runs(ids[:eot], pid)}); put spaces around {{{slot}}} and "
            f"do not use the word {placeholder!r} next to it, or pick another placeholder"
        )
    start = candidates[0]
    return PromptLayout(template=template, text=text, tokens=tokens, slot=slice(start, start + n_slot),
                        eot_index=eot, placeholder=placeholder, placeholder_id=pid)


class _FrozenPrompt(nn.Module):
    """A template split around its placeholder slot into fixed prefix / suffix embedding buffers.

    ``token_prefix`` = token embeddings before the slot (incl. SOT), ``token_suffix`` = after it (the
    aspect words, '.', EOT and padding), computed once under ``no_grad`` from the frozen token embedding;
    ``tokens`` = the template's ids (EOT read from them). All three are buffers: they follow ``.to()``
    and are saved in ``state_dict`` but are never parameters.
    """

    def __init__(self, backbone: ClipBackbone, layout: PromptLayout):
        super().__init__()
        if not isinstance(backbone, ClipBackbone):
            raise TypeError(f"expected a ClipBackbone, got {type(backbone).__name__}")
        object.__setattr__(self, "_backbone", backbone)  # a reference, not a submodule (module doc)
        self.layout = layout
        self.width = int(backbone.token_embedding.embedding_dim)
        with torch.no_grad():
            emb = backbone.token_embedding(layout.tokens).detach()  # [1, L, width]
        self.register_buffer("tokens", layout.tokens.clone())
        self.register_buffer("token_prefix", emb[:, : layout.slot.start].clone())
        self.register_buffer("token_suffix", emb[:, layout.slot.stop:].clone())

    @property
    def backbone(self) -> ClipBackbone:
        return self._backbone

    @property
    def prompt_text(self) -> str:
        return self.layout.text

    @property
    def eot_index(self) -> int:
        return self.layout.eot_index

    @property
    def placeholder(self) -> str:
        return self.layout.placeholder

    def _check_device(self) -> None:
        dev = self.backbone.token_embedding.weight.device
        if self.token_prefix.device != dev:
            raise RuntimeError(f"{type(self).__name__} is on {self.token_prefix.device} but its backbone is on "
                               f"{dev}; move both (module.to(device), backbone.to(device))")

    def assemble(self, middle: torch.Tensor) -> torch.Tensor:
        """[prefix | middle | suffix] token embeddings, ``middle`` [B, n_slot, width] -> [B, L, width]."""
        b = middle.shape[0]
        return torch.cat([self.token_prefix.expand(b, -1, -1), middle.to(self.token_prefix.dtype),
                          self.token_suffix.expand(b, -1, -1)], dim=1)

    def encode(self, middle: torch.Tensor) -> torch.Tensor:
        """Text features [B, D] of the template with ``middle`` in the slot, read at the EOT token."""
        self._check_device()
        emb = self.assemble(middle)
        return self.backbone.encode_text_embeddings(emb, self.tokens.expand(emb.shape[0], -1))

    def extra_repr(self) -> str:
        return f"prompt={self.prompt_text!r}, slot={self.layout.slot}, eot_index={self.eot_index}"


# --------------------------------------------------------------------------------------------------
# CLIP-ReID prompt learner
# --------------------------------------------------------------------------------------------------


class PromptLearner(_FrozenPrompt):
    """Per-identity learnable context (CLIP-ReID stage 1) in ``"A photo of a X X X X {aspect} hand."``.

    ``ctx`` [num_classes, n_ctx, width] (init N(0, init_std) from a generator seeded with ``seed``;
    CLIP-ReID's ``cls_ctx``) replaces the ``n_ctx`` placeholder words. ``forward(labels)`` -> [B, D]
    text features (EOT token, projected with ``text_projection``); only ``ctx`` is trainable.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        num_classes: int,
        n_ctx: int = 4,
        template: str = DEFAULT_TEMPLATE,
        aspect: Optional[str] = "dorsal_r",
        init_std: float = 0.02,
        seed: int = 0,
        placeholder: str = "X",
    ):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        layout = layout_prompt(backbone, template, slot="ctx", n_slot=n_ctx, aspect=aspect, placeholder=placeholder)
        super().__init__(backbone, layout)
        self.num_classes = num_classes
        self.n_ctx = n_ctx
        self.template = template
        self.aspect = aspect
        self.init_std = float(init_std)
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(int(seed))  # on CPU: same ctx on every device
        ctx = torch.randn(num_classes, n_ctx, self.width, generator=gen) * self.init_std
        self.ctx = nn.Parameter(ctx.to(device=self.token_prefix.device, dtype=self.token_prefix.dtype))

    @property
    def ctx_slice(self) -> slice:
        """Positions of the context vectors in the token sequence."""
        return self.layout.slot

    def assemble_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The [B, L, width] embedding sequence [prefix | ctx[labels] | suffix]."""
        return self.assemble(self.ctx[self._check_labels(labels)])

    def _check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=self.ctx.device)
        if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got min {int(labels.min())}, "
                             f"max {int(labels.max())}")
        return labels.long()

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Text features [B, D] of the identities ``labels`` [B]."""
        return self.encode(self.ctx[self._check_labels(labels)])

    @torch.no_grad()
    def all_text_features(self, batch_size: int = 256) -> torch.Tensor:
        """Every identity's text feature [num_classes, D] (no_grad, in chunks of ``batch_size``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        labels = torch.arange(self.num_classes, device=self.ctx.device)
        return torch.cat([self(chunk) for chunk in labels.split(int(batch_size))], dim=0)

    # -- checkpoints ------------------------------------------------------------------------------
    def metadata(self, identities: Optional[Sequence[Any]] = None) -> dict[str, Any]:
        meta = {
            "format": PROMPT_CHECKPOINT_FORMAT,
            "backbone": self.backbone.name,
            "embed_width": self.width,
            "embed_dim": int(self.backbone.embed_dim),
            "num_classes": self.num_classes,
            "n_ctx": self.n_ctx,
            "template": self.template,
            "aspect": self.aspect,
            "placeholder": self.placeholder,
            "prompt_text": self.prompt_text,
            "init_std": self.init_std,
            "seed": self.seed,
        }
        if identities is not None:
            identities = [str(i) for i in identities]
            if len(identities) != self.num_classes:
                raise ValueError(f"{len(identities)} identity names for {self.num_classes} classes")
            meta["identities"] = identities
        return meta

    def state_for_checkpoint(self, identities: Optional[Sequence[Any]] = None) -> dict[str, Any]:
        """``{"meta": {...}, "state_dict": {ctx, tokens, token_prefix, token_suffix}}`` (CPU tensors;
        readable with ``torch.load(weights_only=True)``). ``identities`` (label -> original id, optional)
        lets the loader check it gets prompts for the same identities in the same order."""
        return {"meta": self.metadata(identities),
                "state_dict": {k: t.detach().cpu().clone() for k, t in self.state_dict().items()}}

    @classmethod
    def from_checkpoint(
        cls,
        state: Mapping[str, Any],
        backbone: ClipBackbone,
        num_classes: Optional[int] = None,
        identities: Optional[Sequence[Any]] = None,
    ) -> "PromptLearner":
        """Rebuild a learner from :meth:`state_for_checkpoint` for ``backbone``; ValueError naming every
        mismatch (backbone, width, identities) and when the text encoder's token embeddings differ from
        the ones the prompts were learned with."""
        meta = _meta_of(state)
        check_compatible(meta, backbone.name, num_classes, embed_width=int(backbone.token_embedding.embedding_dim),
                         identities=identities)
        learner = cls(backbone, int(meta["num_classes"]), n_ctx=int(meta["n_ctx"]), template=meta["template"],
                      aspect=meta["aspect"], init_std=float(meta.get("init_std", 0.02)),
                      seed=int(meta.get("seed", 0)), placeholder=meta.get("placeholder", "X"))
        learner.load_checkpoint(state, identities=identities)
        return learner

    def load_checkpoint(self, state: Mapping[str, Any], identities: Optional[Sequence[Any]] = None) -> "PromptLearner":
        """Load ``ctx`` from :meth:`state_for_checkpoint` after checking it was made for this prompt."""
        meta = _meta_of(state)
        check_compatible(meta, self.backbone.name, self.num_classes, embed_width=self.width, n_ctx=self.n_ctx,
                         template=self.template, aspect=self.aspect, identities=identities)
        sd = state["state_dict"]
        missing = [k for k in self.state_dict() if k not in sd]
        if missing:
            raise ValueError(f"prompt checkpoint lacks {', '.join(missing)}")
        if not torch.equal(sd["tokens"].cpu(), self.tokens.cpu()):
            raise ValueError(f"prompt checkpoint tokens differ from those of {self.prompt_text!r} "
                             f"(checkpoint prompt: {meta.get('prompt_text')!r})")
        for key in ("token_prefix", "token_suffix"):
            theirs, ours = sd[key].to(self.token_prefix), getattr(self, key)
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-6, rtol=1e-5):
                raise ValueError(
                    f"the prompts were learned with a different text encoder: the checkpoint's {key} does not "
                    f"match the token embeddings of backbone {self.backbone.display_name!r}; load the backbone "
                    f"weights the prompts were trained with")
        self.load_state_dict({k: sd[k] for k in self.state_dict()}, strict=True)
        return self


def _meta_of(state: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(state, Mapping) or "meta" not in state or "state_dict" not in state:
        raise ValueError("not a prompt-learner checkpoint: expected {'meta': ..., 'state_dict': ...} as written "
                         "by PromptLearner.state_for_checkpoint()")
    meta = state["meta"]
    if meta.get("format") != PROMPT_CHECKPOINT_FORMAT:
        raise ValueError(f"unknown prompt checkpoint format {meta.get('format')!r}; "
                         f"expected {PROMPT_CHECKPOINT_FORMAT!r}")
    return meta


def check_compatible(
    meta: Mapping[str, Any],
    backbone_name: Optional[str] = None,
    num_classes: Optional[int] = None,
    *,
    embed_width: Optional[int] = None,
    n_ctx: Optional[int] = None,
    template: Optional[str] = None,
    aspect: Optional[str] = None,
    identities: Optional[Sequence[Any]] = None,
) -> None:
    """Raise ValueError naming every mismatch between prompt-checkpoint ``meta`` and what the caller
    expects (only the arguments given are checked; ``identities`` only when the checkpoint has them)."""
    problems = []

    def differ(what: str, theirs: Any, ours: Any, hint: str = "") -> None:
        if ours is not None and theirs != ours:
            problems.append(f"{what}: checkpoint has {theirs!r}, expected {ours!r}{hint}")

    differ("backbone", meta.get("backbone"), None if backbone_name is None else str(backbone_name).lower(),
           " (prompts are tied to the text encoder they were learned with)")
    differ("num_classes (training identities)", meta.get("num_classes"), num_classes)
    differ("text embedding width", meta.get("embed_width"), embed_width)
    differ("n_ctx", meta.get("n_ctx"), n_ctx)
    differ("template", meta.get("template"), template)
    if aspect is not None and meta.get("aspect") is not None:
        differ("aspect", aspect_phrase(meta["aspect"]), aspect_phrase(aspect))
    if identities is not None and meta.get("identities") is not None:
        ours = [str(i) for i in identities]
        theirs = list(meta["identities"])
        if ours != theirs:
            if len(ours) != len(theirs):
                problems.append(f"identities: checkpoint has {len(theirs)}, expected {len(ours)}")
            else:
                bad = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
                problems.append(f"identities: label {bad} is {theirs[bad]!r} in the checkpoint but {ours[bad]!r} here")
    if problems:
        raise ValueError("prompt checkpoint does not fit: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# PromptSG composer
# --------------------------------------------------------------------------------------------------


class PromptComposer(_FrozenPrompt):
    """PromptSG's prompt ``"A photo of a S* {aspect} hand."``: each sample's pseudo-word S* (a vector in
    token-embedding space, from the inversion network) replaces the one placeholder token.

    ``forward(pseudo_words [B, width]) -> [B, D]`` runs the frozen text encoder with gradients reaching
    the pseudo-words; :meth:`simplified_text_feature` encodes ``"A photo of a {aspect} hand."``.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        template: str = COMPOSER_TEMPLATE,
        aspect: Optional[str] = "dorsal_r",
        placeholder: str = "X",
        simplified_template: str = SIMPLIFIED_TEMPLATE,
    ):
        layout = layout_prompt(backbone, template, slot="token", n_slot=1, aspect=aspect, placeholder=placeholder)
        super().__init__(backbone, layout)
        self.template = template
        self.aspect = aspect
        fields = _template_fields(simplified_template)
        unknown = sorted(set(fields) - {"aspect"})
        if unknown:
            raise ValueError(f"simplified template {simplified_template!r} may only use {{aspect}}, "
                             f"not {', '.join('{' + f + '}' for f in unknown)}")
        if "aspect" in fields and aspect is None:
            raise ValueError(f"simplified template {simplified_template!r} has {{aspect}} but no aspect was given")
        self.simplified_text = simplified_template.format(
            **({"aspect": aspect_phrase(aspect)} if "aspect" in fields else {}))
        needed = len(clip.clip._tokenizer.encode(self.simplified_text)) + 2
        if needed > backbone.context_length:
            raise ValueError(f"simplified prompt {self.simplified_text!r} needs {needed} tokens, but the context "
                             f"length of {backbone.name!r} is {backbone.context_length}")
        self.register_buffer("simplified_tokens", backbone.tokenize(self.simplified_text))

    @property
    def token_index(self) -> int:
        """Position of the pseudo-word in the token sequence."""
        return self.layout.slot.start

    def forward(self, pseudo_words: torch.Tensor) -> torch.Tensor:
        if pseudo_words.ndim != 2 or pseudo_words.shape[1] != self.width:
            raise ValueError(f"pseudo_words must be [B, {self.width}] (token-embedding width of "
                             f"{self.backbone.name!r}), got {tuple(pseudo_words.shape)}")
        return self.encode(pseudo_words[:, None, :])

    def simplified_text_feature(self) -> torch.Tensor:
        """Text feature [1, D] of the simplified prompt (plain tokens through ``encode_text``)."""
        self._check_device()
        return self.backbone.encode_text(self.simplified_tokens)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", simplified={self.simplified_text!r}"
