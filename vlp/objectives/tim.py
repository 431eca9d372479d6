"""LAViTeR's text-to-image module (TIM) in region-feature space: a text-conditioned generator of region sets
and a discriminator over region sets.

The paper's TIM is AttnGAN's three-scale conv cascade with Inception re-encoding; our images are detector
region features, so the generator emits what the detector store holds: a fixed number of region slots
(``slots``), each a feature (``img_dim``, post-ReLU like the detector's) and a 7-d box [x1, y1, x2, y2, w, h,
w*h] in [0, 1]. It keeps AttnGAN's conditioning:

* conditioning augmentation (CA_NET): a linear map + GLU of the sentence feature gives (μ, log σ²);
  c = μ + σ ε, with the KL term -½ mean(1 + log σ² - μ² - σ²) (AttnGAN's ``KL_loss``: a mean over elements);
* noise z ~ N(0, 1) (AttnGAN and the LAViTeR code; the paper's text says uniform);
* word attention (AttnGAN's attentional stages): the slots cross-attend to the word features.

The slots are learned queries plus a projection of [c; z], refined by ``layers`` transformer decoder layers
(self-attention among the slots, cross-attention to the words).

The discriminator embeds each region (feature and box, as UNITER's image embedder does), prepends a learned
summary token and runs ``layers`` transformer encoder layers with padded slots masked; the summary token's
output gives the unconditional logit (a linear map) and, joined with the sentence feature, the conditional
logit (an MLP, as AttnGAN's ``D_GET_LOGITS`` joins the sentence code with the image code).

Losses (``generator_loss``, ``discriminator_loss``; logits, sigmoid cross-entropy):

* L_G = ½ [BCE(D(x̂), 1) + BCE(D(x̂, ē), 1)] (Eq. 9);
* L_D = ½ [BCE(D(x), 1) + BCE(D(x̂), 0) + BCE(D(x, ē), 1) + BCE(D(x̂, ē), 0)] (Eq. 10); with ``mismatch`` (the
  LAViTeR and AttnGAN code) real regions with another example's sentence are a third kind of fake for the
  conditional logit, and the terms are averaged as AttnGAN does: (real + cond real) / 2 + (fake + cond fake
  + cond wrong) / 3.

Beyond the paper (off by default): feature matching (Salimans et al. 2016), the squared distance between the
batch means of the discriminator's summary features on real and on generated sets (``feature_matching``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.objectives.common import init_head_weights

POS_DIM = 7


def boxes_7d(corners: Tensor) -> Tensor:
    """[..., 4] values in [0, 1] -> [..., 7] boxes [x1, y1, x2, y2, w, h, w*h] (corners ordered)."""
    x1, x2 = torch.minimum(corners[..., 0], corners[..., 2]), torch.maximum(corners[..., 0], corners[..., 2])
    y1, y2 = torch.minimum(corners[..., 1], corners[..., 3]), torch.maximum(corners[..., 1], corners[..., 3])
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1, y1, x2, y2, w, h, w * h], dim=-1)


def kl_loss(mu: Tensor, logvar: Tensor) -> Tensor:
    """AttnGAN's KL(N(μ, σ²) || N(0, 1)) term of conditioning augmentation: a mean over the elements."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean()


@dataclass
class GeneratedRegions:
    features: Tensor  # [B, K, img_dim]
    boxes: Tensor  # [B, K, 7]
    mask: Tensor  # Bool[B, K], all real
    mu: Tensor  # [B, cond_dim]
    logvar: Tensor  # [B, cond_dim]


class RegionGenerator(nn.Module):
    def __init__(self, text_dim: int, img_dim: int, *, slots: int = 10, hidden: int = 256,
                 cond_dim: int = 100, noise_dim: int = 100, layers: int = 2, heads: int = 4,
                 initializer_range: float = 0.02) -> None:
        super().__init__()
        if min(slots, hidden, cond_dim, noise_dim, layers, heads) < 1 or hidden % heads:
            raise ValueError(f"RegionGenerator needs positive sizes and heads dividing hidden, got slots "
                             f"{slots}, hidden {hidden}, cond_dim {cond_dim}, noise_dim {noise_dim}, layers "
                             f"{layers}, heads {heads}")
        self.cond_dim, self.noise_dim, self.slots = cond_dim, noise_dim, slots
        self.ca = nn.Linear(text_dim, 4 * cond_dim)  # GLU halves it: (μ, log σ²)
        self.code = nn.Linear(cond_dim + noise_dim, hidden)
        self.slot_queries = nn.Parameter(torch.zeros(slots, hidden))
        self.words = nn.Linear(text_dim, hidden)
        layer = nn.TransformerDecoderLayer(hidden, heads, 4 * hidden, dropout=0.0, activation="gelu",
                                           batch_first=True)
        self.body = nn.TransformerDecoder(layer, layers)
        self.feature_head = nn.Linear(hidden, img_dim)
        self.box_head = nn.Linear(hidden, 4)
        init_head_weights(self, initializer_range)
        nn.init.normal_(self.slot_queries, std=1.0)

    def condition(self, sentence: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c, μ, log σ²) of conditioning augmentation."""
        mu, logvar = F.glu(self.ca(sentence), dim=-1).chunk(2, dim=-1)
        c = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return c, mu, logvar

    def forward(self, sentence: Tensor, words: Tensor, word_mask: Tensor,
                noise: Tensor | None = None) -> GeneratedRegions:
        """Region sets for sentence features [B, d] and word features [B, T, d] (real where ``word_mask``);
        ``noise`` [B, noise_dim] (None: drawn from N(0, 1) with torch's global generator)."""
        b = sentence.shape[0]
        c, mu, logvar = self.condition(sentence)
        if noise is None:
            noise = torch.randn(b, self.noise_dim, device=sentence.device, dtype=c.dtype)
        code = self.code(torch.cat([c, noise.to(c.dtype)], dim=-1))
        slots = self.slot_queries[None] + code[:, None, :]
        word_mask = word_mask.bool()
        # A caption without words still conditions through c; the attention then sees one zero word.
        no_words = ~word_mask.any(1)
        memory_mask = word_mask.clone()
        memory_mask[no_words, 0] = True
        h = self.body(slots, self.words(words), memory_key_padding_mask=~memory_mask)
        features = F.relu(self.feature_head(h))
        boxes = boxes_7d(torch.sigmoid(self.box_head(h)))
        mask = torch.ones(b, self.slots, dtype=torch.bool, device=sentence.device)
        return GeneratedRegions(features, boxes, mask, mu, logvar)


class SetDiscriminator(nn.Module):
    def __init__(self, img_dim: int, text_dim: int, *, hidden: int = 256, layers: int = 2, heads: int = 4,
                 initializer_range: float = 0.02) -> None:
        super().__init__()
        if min(hidden, layers, heads) < 1 or hidden % heads:
            raise ValueError(f"SetDiscriminator needs positive sizes and heads dividing hidden, got hidden "
                             f"{hidden}, layers {layers}, heads {heads}")
        self.feature = nn.Linear(img_dim, hidden)
        self.feature_norm = nn.LayerNorm(hidden)
        self.box = nn.Linear(POS_DIM, hidden)
        self.box_norm = nn.LayerNorm(hidden)
        self.summary = nn.Parameter(torch.zeros(1, 1, hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, activation="gelu",
                                           batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.unconditional = nn.Linear(hidden, 1)
        self.conditional = nn.Sequential(nn.Linear(hidden + text_dim, hidden), nn.LeakyReLU(0.2),
                                         nn.Linear(hidden, 1))
        init_head_weights(self, initializer_range)

    def features(self, features: Tensor, boxes: Tensor, mask: Tensor) -> Tensor:
        """[B, hidden] summary of each region set; padded slots (``mask`` False) take no part."""
        x = self.feature_norm(self.feature(features)) + self.box_norm(self.box(boxes))
        x = torch.cat([self.summary.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        keep = torch.cat([torch.ones_like(mask[:, :1], dtype=torch.bool), mask.bool()], dim=1)
        return self.body(x, src_key_padding_mask=~keep)[:, 0]

    def forward(self, features: Tensor, boxes: Tensor, mask: Tensor,
                sentence: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(unconditional logits [B], conditional logits [B], summary features [B, hidden])."""
        h = self.features(features, boxes, mask)
        cond = self.conditional(torch.cat([h, sentence.to(h.dtype)], dim=-1))
        return self.unconditional(h).squeeze(-1), cond.squeeze(-1), h


def frozen(module: nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)`` with its parameters detached: gradients reach the inputs only (the
    generator step sees the discriminator this way, so the step leaves it no gradient)."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args, kwargs)


def _bce(logits: Tensor, target: float) -> Tensor:
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def generator_loss(fake_uncond: Tensor, fake_cond: Tensor) -> Tensor:
    """L_G (Eq. 9): the generated sets judged real, unconditionally and given their sentence."""
    return 0.5 * (_bce(fake_uncond, 1.0) + _bce(fake_cond, 1.0))


def discriminator_loss(real_uncond: Tensor, real_cond: Tensor, fake_uncond: Tensor, fake_cond: Tensor,
                       wrong_cond: Tensor | None = None) -> Tensor:
    """L_D (Eq. 10); with ``wrong_cond`` (real sets with mismatched sentences) AttnGAN's averaging."""
    if wrong_cond is None:
        return 0.5 * (_bce(real_uncond, 1.0) + _bce(fake_uncond, 0.0) + _bce(real_cond, 1.0)
                      + _bce(fake_cond, 0.0))
    return ((_bce(real_uncond, 1.0) + _bce(real_cond, 1.0)) / 2
            + (_bce(fake_uncond, 0.0) + _bce(fake_cond, 0.0) + _bce(wrong_cond, 0.0)) / 3)


def feature_matching_loss(real: Tensor, fake: Tensor) -> Tensor:
    """||mean real summary - mean generated summary||² (real features carry no gradient)."""
    return (real.detach().float().mean(0) - fake.float().mean(0)).pow(2).sum()


def mismatched(sentence: Tensor, img_keys: list[str]) -> tuple[Tensor, Tensor]:
    """(another example's sentence for each example, where that sentence describes another image): example
    i gets sentence i + 1 (cyclically), kept only where the image keys differ."""
    shift = torch.roll(torch.arange(len(img_keys)), -1)
    differ = torch.tensor([img_keys[i] != img_keys[int(j)] for i, j in enumerate(shift)], dtype=torch.bool)
    return sentence[shift.to(sentence.device)], differ.to(sentence.device)
