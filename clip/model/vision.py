"""The ViT image tower: openai/CLIP's `VisionTransformer`, with OpenCLIP's and SigLIP's options as config.

openai/CLIP's constructor and module boundaries: `conv1`, `class_embedding`, `positional_embedding`,
`ln_pre`, `transformer` (`[L, N, D]`), `ln_post`, `proj` (set it to None for unprojected features).
OpenCLIP's options: average pooling, LayerNorm after pooling, no `ln_pre`, layer scale, `mlp_ratio`.
SigLIP's: no class token, a biased patch conv, and the MAP attention-pool head (`head`) in place of
the class token and projection.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clip.model.layers import Attention, LayerNorm, Transformer, make_act


class MAPHead(nn.Module):
    """Multihead attention pooling (SigLIP): a learned probe attends over all tokens, then an MLP.

    x: [N, L, D] -> [N, D].  pooled = a + mlp(ln(a)) with a = attention(probe, x, x).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 quick_gelu: bool = False, gelu_approximate: str = "none") -> None:  # fmt: skip
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attn = Attention(width, heads, batch_first=True)
        self.ln = LayerNorm(width, eps=norm_eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", make_act(quick_gelu, gelu_approximate)),
                         ("c_proj", nn.Linear(hidden, width))])
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe.to(x.dtype).expand(x.shape[0], -1, -1)  # [N, 1, D]
        a = self.attn(probe, x, x, need_weights=False)[0]
        return (a + self.mlp(self.ln(a)))[:, 0]


class ConvStem(nn.Module):
    """Early convolutions in place of the patch conv (Xiao et al. 2021): 3x3 stride-2 convs with GELU, each
    halving the grid, then a 1x1 conv to the width.  image [N, 3, H, W] -> [N, width, H / 2^k, W / 2^k]."""

    def __init__(self, channels: tuple[int, ...], width: int, bias: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GELU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, width, 1, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        """The last conv's weight: `CLIP.dtype` reads `visual.conv1.weight`, as openai/CLIP does."""
        return self.proj.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))


class VisionTransformer(nn.Module):
    """ViT image tower: patchify, (class token), Transformer on `[L, N, D]`, pool, project.

    forward: image [N, 3, H, W] -> features [N, output_dim].  Inputs of another size than
    `input_resolution` need `interpolate_pos_encoding=True` (bicubic, as Hugging Face does).
    """

    def __init__(
        self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
        *, quick_gelu: bool = True, mlp_ratio: float = 4.0, ls_init_value: float | None = None,
        no_ln_pre: bool = False, pool_type: str = "tok", final_ln_after_pool: bool = False,
        class_token: bool = True, patch_bias: bool = False, proj: bool = True, norm_eps: float = 1e-5,
        gelu_approximate: str = "none", conv_stem: tuple[int, ...] = (),
    ) -> None:  # fmt: skip
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.output_dim = output_dim
        self.pool_type = pool_type
        self.final_ln_after_pool = final_ln_after_pool
        if conv_stem:
            self.conv1: nn.Module = ConvStem(tuple(conv_stem), width, patch_bias)
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=patch_bias)
        scale = width**-0.5
        grid = input_resolution // patch_size
        self.num_prefix_tokens = 1 if class_token else 0
        if class_token:
            self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn(grid * grid + self.num_prefix_tokens, width)
        )
        self.ln_pre = nn.Identity() if no_ln_pre else LayerNorm(width, eps=norm_eps)
        self.transformer = Transformer(
            width, layers, heads, mlp_ratio=mlp_ratio, ls_init_value=ls_init_value, quick_gelu=quick_gelu,
            gelu_approximate=gelu_approximate, norm_eps=norm_eps,
        )  # fmt: skip
        self.ln_post = LayerNorm(width, eps=norm_eps)
        if pool_type == "map":
            self.head = MAPHead(width, heads, mlp_ratio, norm_eps, quick_gelu, gelu_approximate)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim)) if proj else None

    def embed(self, x: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """image [N, 3, H, W] -> tokens [N, L, D] (patches, class token first, positions added, ln_pre)."""
        x = self.conv1(x)  # [N, D, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [N, gh*gw, D]
        if self.num_prefix_tokens:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        pos = self.positional_embedding
        grid = self.input_resolution // self.patch_size
        # Compare grids, not token counts: a 2x8 grid has as many patches as a 4x4 one.
        if (gh, gw) != (grid, grid):
            if not interpolate_pos_encoding:
                raise ValueError(
                    f"image of {gh * self.patch_size}x{gw * self.patch_size} pixels does not match the model's "
                    f"{self.input_resolution}x{self.input_resolution}; resize it, or pass interpolate_pos_encoding=True"
                )
            pos = interpolate_positions(pos, self.num_prefix_tokens, (int(gh), int(gw)))
        return self.ln_pre(x + pos.to(x.dtype))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """tokens after the transformer [N, L, D] -> pooled [N, D] (before the projection)."""
        if self.pool_type == "map":
            return self.head(self.ln_post(x))
        if self.final_ln_after_pool:
            return self.ln_post(self._global_pool(x))
        return self._global_pool(self.ln_post(x))

    def _global_pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]

    def forward(self, x: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """x: [N, 3, H, W] -> [N, output_dim] (or [N, width] when `proj` is None)."""
        x = self.embed(x, interpolate_pos_encoding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD, as openai/CLIP
        x = self.pool(x)
        return x @ self.proj if self.proj is not None else x

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | None = None, stop_early: bool = False,
        normalize_intermediates: bool = False, intermediates_only: bool = False, output_fmt: str = "NCHW",
        output_extra_tokens: bool = False, interpolate_pos_encoding: bool = False,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:  # fmt: skip
        """OpenCLIP's `forward_intermediates` (same arguments, keys and shapes): image [N, 3, H, W] ->

        `image_intermediates`: the patch tokens of blocks `indices` (None: all; int n: the last n; a
        list: those), [N, D, gh, gw] ("NCHW") or [N, gh*gw, D] ("NLC"); `image_intermediates_prefix`
        (with `output_extra_tokens`): their class tokens [N, 1, D]; `image_features` [N, output_dim].
        `stop_early` takes effect with `intermediates_only`.  Also `image_embeddings`, the input of
        the first block [N, L, D].  Hugging Face's
        `hidden_states[i + 1]` is `torch.cat([prefix[i], tokens[i]], 1)` with "NLC" (and
        `hidden_states[0]` is `image_embeddings`).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        tokens = self.embed(x, interpolate_pos_encoding)
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        # Stopping early only when nothing after the last wanted block is returned (OpenCLIP would pool
        # the truncated tower's output into `image_features`).
        stop = stop_early and intermediates_only
        out, hidden = self.transformer.forward_intermediates(tokens.permute(1, 0, 2), indices, stop)
        hidden = [h.permute(1, 0, 2) for h in hidden]  # LND -> NLD
        if normalize_intermediates:
            hidden = [self.ln_post(h) for h in hidden]
        p = self.num_prefix_tokens
        patches = [h[:, p:] for h in hidden]
        if output_fmt == "NCHW":
            patches = [t.reshape(t.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous() for t in patches]
        result: dict[str, torch.Tensor | list[torch.Tensor]] = {"image_intermediates": patches}
        if output_extra_tokens and p:
            result["image_intermediates_prefix"] = [h[:, :p] for h in hidden]
        result["image_embeddings"] = tokens
        if intermediates_only:
            return result
        pooled = self.pool(out.permute(1, 0, 2))
        result["image_features"] = pooled @ self.proj if self.proj is not None else pooled
        return result


def interpolate_positions(
    pos: torch.Tensor, prefix: int, grid: tuple[int, int], antialias: bool = False
) -> torch.Tensor:
    """Position embeddings [prefix + g*g, D] -> [prefix + gh*gw, D], bicubic over the patch grid.

    Hugging Face's `interpolate_pos_encoding` and OpenCLIP's `resize_pos_embed` (used for
    `force_image_size`) both resample the square grid bicubically without corner alignment;
    OpenCLIP also antialiases (`antialias=True`), which changes the result only when shrinking.
    """
    cls, patches = pos[:prefix], pos[prefix:]
    old = round(patches.shape[0] ** 0.5)
    if old * old != patches.shape[0]:
        raise ValueError(f"position embeddings of {patches.shape[0]} patches are not a square grid")
    if (old, old) == tuple(grid):
        return pos
    grid_pos = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid_pos = F.interpolate(
        grid_pos, size=tuple(grid), mode="bicubic", align_corners=False, antialias=antialias
    )
    patches = grid_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([cls, patches], dim=0)
