"""The CLIP model: openai/CLIP's module tree, state-dict keys and constructor, configured by `CLIPConfig`.

Keys are OpenAI's (`visual.*`, `transformer.resblocks.N.attn.in_proj_weight`, `token_embedding`,
`positional_embedding`, `ln_final`, `text_projection`, `logit_scale`), so OpenAI and OpenCLIP state
dicts load without renaming, and code that reaches into `model.visual` or `model.transformer`
(prompt learners such as CoOp) sees openai/CLIP's modules and `[L, N, D]` layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip.config import CLIPConfig, VisionConfig
from clip.model.layers import LayerNorm, Transformer, causal_mask
from clip.model.resnet import ModifiedResNet
from clip.model.vision import VisionTransformer

_OPENAI_ARGS = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                "context_length", "vocab_size", "transformer_width", "transformer_heads", "transformer_layers")  # fmt: skip


def build_vision_tower(cfg: VisionConfig, embed_dim: int, quick_gelu: bool) -> nn.Module:
    if cfg.kind == "resnet":
        return ModifiedResNet(cfg.layers, embed_dim, cfg.heads, cfg.image_size, cfg.width)
    return VisionTransformer(
        cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads, embed_dim, quick_gelu=quick_gelu,
        mlp_ratio=cfg.mlp_ratio, ls_init_value=cfg.ls_init_value, no_ln_pre=cfg.no_ln_pre,
        pool_type=cfg.pool_type, final_ln_after_pool=cfg.final_ln_after_pool, class_token=cfg.class_token,
        patch_bias=cfg.patch_bias, proj=cfg.proj, norm_eps=cfg.norm_eps, gelu_approximate=cfg.gelu_approximate,
        conv_stem=cfg.conv_stem,
    )  # fmt: skip


def _config_from_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> CLIPConfig:
    if len(args) == 1 and not kwargs and isinstance(args[0], CLIPConfig):
        return args[0]
    if "config" in kwargs and not args:
        return kwargs["config"]
    if len(args) > len(_OPENAI_ARGS):
        raise TypeError(f"CLIP() takes a CLIPConfig or openai/CLIP's {len(_OPENAI_ARGS)} arguments")
    named = dict(zip(_OPENAI_ARGS, args))
    clash = sorted(set(named) & set(kwargs))
    if clash:
        raise TypeError(f"CLIP() got multiple values for {clash}")
    return CLIPConfig.from_openai_args({**named, **kwargs})


class CLIP(nn.Module):
    """Image and text towers projected into one embedding space, compared by cosine similarity.

    `CLIP(config)` or openai/CLIP's `CLIP(embed_dim, image_resolution, vision_layers, vision_width,
    vision_patch_size, context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        config = _config_from_args(args, kwargs)
        self.config = config
        t = config.text
        self.context_length = t.context_length
        self.vocab_size = t.vocab_size
        self.visual = build_vision_tower(config.vision, config.embed_dim, config.quick_gelu)
        self.transformer = Transformer(
            t.width, t.layers, t.heads, self.build_attention_mask() if t.causal else None,
            mlp_ratio=t.mlp_ratio, ls_init_value=t.ls_init_value, quick_gelu=config.quick_gelu,
            gelu_approximate=t.gelu_approximate, norm_eps=t.norm_eps,
        )  # fmt: skip
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.ln_final = LayerNorm(t.width, eps=t.norm_eps)
        if t.proj_bias:
            self.text_projection = nn.Linear(t.width, config.embed_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        if config.logit_bias:
            self.logit_bias = nn.Parameter(torch.full([], -10.0))  # SigLIP's initial bias
        self.initialize_parameters()

    def build_attention_mask(self) -> torch.Tensor:
        """openai/CLIP's causal mask [context_length, context_length]: -inf above the diagonal."""
        return causal_mask(self.context_length)

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation (std scaled by width and depth), applied to both towers."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
            for name, param in self.visual.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)  # each residual branch starts as identity
        else:
            _init_transformer(self.visual.transformer)
        _init_transformer(self.transformer)
        proj = self.text_projection
        nn.init.normal_(
            proj.weight if isinstance(proj, nn.Linear) else proj, std=self.transformer.width**-0.5
        )
        if isinstance(proj, nn.Linear):
            nn.init.zeros_(proj.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable

    def encode_image(self, image: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """image: [N, 3, H, W] -> features [N, embed_dim] (not normalised)."""
        if interpolate_pos_encoding:
            return self.visual(image.to(self.dtype), interpolate_pos_encoding=True)
        return self.visual(image.to(self.dtype))

    def _pool_index(self, text: torch.Tensor) -> torch.Tensor | None:
        """The position each row is pooled at [N], or None for "last" (the final position)."""
        t = self.config.text
        if t.pool_type == "argmax":  # OpenAI: the end-of-text token has the highest id
            return text.argmax(dim=-1)
        if t.pool_type == "eos":
            return (text == t.eos_id).int().argmax(dim=-1)
        if t.pool_type == "first":
            return torch.zeros(text.shape[0], dtype=torch.long, device=text.device)
        return None

    def trim_text(self, text: torch.Tensor, multiple: int = 1) -> torch.Tensor:
        """Token ids [N, L] -> [N, L'], cut after the batch's last pooled token, L' rounded up to `multiple`.

        Exact where later positions cannot change the features (a causal tower pooled at one position:
        OpenAI's end-of-text argmax, or OpenCLIP's `eos_id`); any other tower gets `text` unchanged.  The
        one definition of the end-of-text cut: `encode_text` (on CPU), zero-shot weights and training use it.
        """
        index = self._pool_index(text)
        if (
            index is None
            or text.numel() == 0
            or not self.config.text.cut_after_eot
            or not self.transformer.is_causal
        ):
            return text
        last = int(index.max()) + 1
        return text[:, : min(text.shape[1], -(-last // multiple) * multiple)]

    def _cut(self, text: torch.Tensor) -> torch.Tensor:
        """Drop the positions after the last pooled token where they cannot change the features.

        Attention is causal and pooling reads one position, so later positions are dead weight: on
        CPU they are cut off (a large saving for short captions); on accelerators the full length is
        kept, since finding the cut needs a host sync.  Not while tracing or compiling (a traced cut
        would be frozen to the example's length), nor when a block's mask was changed by the caller.
        """
        if text.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return text
        return self.trim_text(text)  # itself a no-op where the cut would not be exact

    def text_tokens(self, text: torch.Tensor, cut: bool = True) -> torch.Tensor:
        """token ids [N, L] -> the text transformer's input [N, L', D] (embeddings + positions)."""
        if cut:
            text = self._cut(text)
        length = text.shape[1]
        return self.token_embedding(text).to(self.dtype) + self.positional_embedding[:length].to(self.dtype)

    def _project_text(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """final hidden states [N, L, D] -> projected features [N, embed_dim]."""
        x = self.ln_final(x).to(self.dtype)
        index = self._pool_index(text)
        pooled = x[:, -1] if index is None else x[torch.arange(x.shape[0], device=x.device), index]
        proj = self.text_projection
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """text: token ids [N, context_length] -> features [N, embed_dim] (not normalised)."""
        x = self.text_tokens(text)  # [N, L, D]
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD, as openai/CLIP
        return self._project_text(x, text)

    def text_intermediates(
        self, text: torch.Tensor, indices: int | list[int] | None = None, stop_early: bool = False,
        normalize_intermediates: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """Hidden states of the text tower at full length (no end-of-text cut): ids [N, L] ->

        `text_embeddings` [N, L, D] (Hugging Face's `hidden_states[0]`), `text_intermediates` (the
        outputs of blocks `indices` as in `forward_intermediates`, each [N, L, D]: `hidden_states[i + 1]`),
        and, unless `stop_early`, `text_tokens` (after `ln_final` [N, L, D]: HF's `last_hidden_state`)
        and `text_features` [N, embed_dim] (not normalised).  The penultimate layer that diffusion
        pipelines use ("clip skip"): `model.ln_final(model.text_intermediates(ids, [-2])["text_intermediates"][0])`.
        """
        x = self.text_tokens(text, cut=False)
        out, hidden = self.transformer.forward_intermediates(x.permute(1, 0, 2), indices, stop_early)
        hidden = [h.permute(1, 0, 2) for h in hidden]  # LND -> NLD
        if normalize_intermediates:
            hidden = [self.ln_final(h) for h in hidden]
        result: dict[str, Any] = {"text_embeddings": x, "text_intermediates": hidden}
        if not stop_early:
            out = out.permute(1, 0, 2)
            result["text_tokens"] = self.ln_final(out)
            result["text_features"] = self._project_text(out, text)
        return result

    def forward_intermediates(
        self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
        image_indices: int | list[int] | None = None, text_indices: int | list[int] | None = None,
        stop_early: bool = False, normalize: bool = True, normalize_intermediates: bool = False,
        intermediates_only: bool = False, image_output_fmt: str = "NCHW", image_output_extra_tokens: bool = False,
        text_output_fmt: str = "NLC", text_output_extra_tokens: bool = False, output_logits: bool = False,
        output_logit_scale_bias: bool = False, interpolate_pos_encoding: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """OpenCLIP's `CLIP.forward_intermediates`: same arguments, defaults, keys and shapes.

        Intermediates of whichever towers get an input (ViT image towers only): see
        `VisionTransformer.forward_intermediates` and `text_intermediates`.  As in OpenCLIP the final
        `image_features` / `text_features` are L2-normalised unless `normalize=False`, and
        `intermediates_only` returns the intermediates alone.  `image_logits` are always cosine logits
        (OpenCLIP's, with `normalize=False`, scale unnormalised dot products).  `text_output_fmt` and
        `text_output_extra_tokens` are accepted and ignored, as OpenCLIP does (no text class token).
        """
        if intermediates_only:
            normalize, output_logits = False, False
        if output_logits and (image is None or text is None):
            raise ValueError("output_logits=True needs both image and text")
        out: dict[str, Any] = {}
        if image is not None:
            if not isinstance(self.visual, VisionTransformer):
                raise ValueError("forward_intermediates supports ViT image towers; this model has a ResNet")
            out.update(self.visual.forward_intermediates(
                image.to(self.dtype), image_indices, stop_early, normalize_intermediates, intermediates_only,
                image_output_fmt, image_output_extra_tokens, interpolate_pos_encoding,
            ))  # fmt: skip
        if text is not None:
            t = self.text_intermediates(
                text, text_indices, stop_early and intermediates_only, normalize_intermediates
            )
            t.pop("text_tokens", None)
            if intermediates_only:
                t.pop("text_features", None)
            out.update(t)
        for key in ("image_features", "text_features"):
            if normalize and key in out:
                out[key] = F.normalize(out[key], dim=-1)
        if output_logits:
            logits = self.logits(out["image_features"], out["text_features"])
            out["image_logits"], out["text_logits"] = logits, logits.t()
        if output_logit_scale_bias:
            out["logit_scale"] = self.logit_scale.exp()
            if hasattr(self, "logit_bias"):
                out["logit_bias"] = self.logit_bias
        return out

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Normalised features [N_img, E], [N_txt, E] -> logits [N_img, N_txt] (scaled, plus SigLIP's bias)."""
        logits = (
            self.logit_scale.exp()
            * F.normalize(image_features, dim=-1)
            @ F.normalize(text_features, dim=-1).t()
        )
        bias = getattr(self, "logit_bias", None)
        return logits + bias if bias is not None else logits

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_per_image [N_img, N_txt], logits_per_text [N_txt, N_img])."""
        logits_per_image = self.logits(self.encode_image(image), self.encode_text(text))
        return logits_per_image, logits_per_image.t()


def _init_transformer(tf: Transformer) -> None:
    proj_std = (tf.width**-0.5) * ((2 * tf.layers) ** -0.5)
    attn_std = tf.width**-0.5
    fc_std = (2 * tf.width) ** -0.5
    for block in tf.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
