"""CLIP's modules, with OpenAI's module tree and state-dict keys.

Only `nn.Module`s live here: no file access, no downloads, no `torch.distributed`.  The
key names (`visual.conv1`, `visual.transformer.resblocks.N.attn.in_proj_weight`,
`token_embedding`, `positional_embedding`, `ln_final`, `text_projection`, `logit_scale`)
are OpenAI's, so OpenAI and OpenCLIP state dicts load without renaming and code that
reaches into `model.visual` or `model.transformer` (prompt learners such as CoOp) works.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip.config import CLIPConfig, VisionConfig


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (fp16/bf16 inference stays stable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig = x.dtype
        if orig == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(orig)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI trained its released models with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names, through SDPA.

    Parameters: in_proj_weight [3D, D], in_proj_bias [3D], out_proj (Linear D -> D).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x: [N, L, D] (batch first) -> [N, L, D]."""
        n, seq, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [N, L, 3D]
        qkv = qkv.view(n, seq, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [3, N, H, L, hd]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)  # [N, H, L, hd]
        return self.out_proj(out.transpose(1, 2).reshape(n, seq, d))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, quick_gelu: bool = True) -> None:
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        act = QuickGELU() if quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", act),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x: [N, L, D] -> [N, L, D]."""
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks.

    `forward` takes OpenAI's sequence-first layout [L, N, D] by default, so outside code written
    for openai/CLIP keeps working; the towers call it with `batch_first=True` and skip two permutes.
    """

    def __init__(
        self, width: int, layers: int, heads: int, causal: bool = False, quick_gelu: bool = True
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.causal = causal
        self.grad_checkpointing = False
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, batch_first: bool = False) -> torch.Tensor:
        """x: [L, N, D] (or [N, L, D] with batch_first) -> the same layout."""
        if not batch_first:
            x = x.transpose(0, 1)
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, causal=self.causal)
        return x if batch_first else x.transpose(0, 1)


class VisionTransformer(nn.Module):
    """ViT image tower: patchify, prepend a class token, Transformer, project the class token."""

    def __init__(
        self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
        quick_gelu: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu=quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, H, W] -> [N, output_dim]."""
        x = self.conv1(x)  # [N, D, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [N, grid*grid, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [N, L, D]
        x = self.ln_pre(x)
        x = self.transformer(x, batch_first=True)
        return self.ln_post(x[:, 0, :]) @ self.proj


class Bottleneck(nn.Module):
    """ResNet bottleneck with OpenAI's changes: anti-aliased strides (avgpool before the stride-1 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean feature queries all positions (QKV + output projection)."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] -> [N, output_dim]."""
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        n, seq, c = x.shape
        hd = c // self.num_heads
        q = self.q_proj(x[:, :1]).view(n, 1, self.num_heads, hd).transpose(1, 2)  # [N, H, 1, hd]
        k = self.k_proj(x).view(n, seq, self.num_heads, hd).transpose(1, 2)  # [N, H, L, hd]
        v = self.v_proj(x).view(n, seq, self.num_heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, H, 1, hd]
        return self.c_proj(out.transpose(1, 2).reshape(n, c))


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: 3-conv stem with avgpool, anti-aliased strides, attention pooling."""

    def __init__(
        self, layers: tuple[int, int, int, int], output_dim: int, heads: int, input_resolution: int = 224,
        width: int = 64,
    ) -> None:  # fmt: skip
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, H, W] -> [N, output_dim]."""
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


def build_vision_tower(cfg: VisionConfig, embed_dim: int, quick_gelu: bool) -> nn.Module:
    if cfg.kind == "resnet":
        return ModifiedResNet(cfg.layers, embed_dim, cfg.heads, cfg.image_size, cfg.width)
    return VisionTransformer(
        cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads, embed_dim, quick_gelu
    )


class CLIP(nn.Module):
    """Image and text towers projected into one embedding space, compared by cosine similarity."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        t = config.text
        self.context_length = t.context_length
        self.vocab_size = t.vocab_size
        self.visual = build_vision_tower(config.vision, config.embed_dim, config.quick_gelu)
        self.transformer = Transformer(t.width, t.layers, t.heads, causal=True, quick_gelu=config.quick_gelu)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()

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
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image: [N, 3, H, W] -> features [N, embed_dim] (not normalised)."""
        return self.visual(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """text: token ids [N, context_length] -> features [N, embed_dim] (not normalised).

        Pooled at the end-of-text token, which has the highest id in each row.  Attention is causal,
        so positions after the last end-of-text token cannot change the result: on CPU they are cut
        off (a large saving for short captions); on accelerators the full length is kept, since
        finding the cut needs a host sync.
        """
        eot = text.argmax(dim=-1)  # [N]
        # Not while tracing or compiling: a traced cut would be frozen to the example's length.
        if text.device.type == "cpu" and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            text = text[:, : int(eot.max()) + 1]
        length = text.shape[1]
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding[:length].to(
            self.dtype
        )  # [N, L, D]
        x = self.transformer(x, batch_first=True)
        x = self.ln_final(x).to(self.dtype)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_per_image [N_img, N_txt], logits_per_text [N_txt, N_img])."""
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
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


def convert_weights_to_lp(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Cast weights of linear/conv/attention layers and CLIP's projections to `dtype`, in place.

    LayerNorms and BatchNorms stay fp32 (LayerNorm computes in fp32 anyway), as in openai/CLIP.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
            module.to(dtype)
        if isinstance(module, Attention):
            module.in_proj_weight.data = module.in_proj_weight.data.to(dtype)
            module.in_proj_bias.data = module.in_proj_bias.data.to(dtype)
        for name in ("text_projection", "proj", "class_embedding", "positional_embedding"):
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter):
                p.data = p.data.to(dtype)
    return model
