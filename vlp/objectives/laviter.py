"""LAViTeR (Shaikh et al.) in region-feature space: the ``laviter`` pretraining task.

One step computes, on one batch, the paper's joint loss (Eq. 16)

    L = λ1 L_TIM + λ2 L_C + λ3 L_FI + λ4 L_FT + λ5 L_VTA

with the weights ``lambdas`` = (λ_TIM, λ_C, λ_FI, λ_FT, λ_VTA) applied by the training loop
(``vlp.train.pretrain_model.loss_weights``: the losses are returned unweighted, so validation reports them
as they are). The parts:

* L_VTA (``laviter_vta_word_loss`` + ``laviter_vta_sentence_loss``): DAMSM on the real pair
  (``vlp.objectives.damsm``), the encoder run on the text alone and on the regions alone;
* L_C (``laviter_cap_loss``): the captioner's teacher-forced cross-entropy over the image-only pass's region
  outputs (``vlp.objectives.captioner``);
* L_FT (``laviter_ft_loss``): DAMSM word + sentence (both directions) between the real regions and the fake
  caption, the argmax of the teacher-forced logits cut at its first [SEP] (not differentiable: it trains the
  encoder and the VTA projections only);
* L_TIM (``laviter_gen_loss`` + ``laviter_kl_loss`` [+ ``laviter_fm_loss``]): the region generator's
  adversarial loss against a discriminator that sees it frozen, plus conditioning augmentation's KL term
  (AttnGAN adds it with weight 1) and, when enabled, feature matching (a stabiliser beyond the paper);
* L_FI (``laviter_fi_loss``): DAMSM between the generated regions, run through the encoder's image-only pass
  like real ones, and the real text; the generator takes the non-detached text features (as the LAViTeR
  code does), so L_FI trains the encoder, the projections and the generator.

The discriminator is not trained by this loss: the loop gives it its own optimizer and step
(``discriminator_step``, ``vlp.train.adversarial``). A part whose λ is 0 is not computed, and a module no
part needs is not built (λ_C = λ_FT = 0: no captioner; λ_TIM = λ_FI = 0: no generator, no discriminator).
L_FT needs a trained captioner (λ_C > 0) and L_FI a trained generator (λ_TIM > 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vlp.model.uniter import UniterModel
from vlp.objectives.captioner import Captioner, fake_captions
from vlp.objectives.damsm import GAMMAS, VTA, ImageFeatures, TextFeatures
from vlp.objectives.itc import positives
from vlp.objectives.tim import (
    RegionGenerator,
    SetDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    frozen,
    generator_loss,
    kl_loss,
    mismatched,
)

# (λ_TIM, λ_C, λ_FI, λ_FT, λ_VTA): the paper's best COCO setting (Table 1, row 3).
PAPER_LAMBDAS = (0.01, 0.1, 1.0, 1.0, 50.0)
LAMBDA_NAMES = ("tim", "cap", "fi", "ft", "vta")
# The loss each λ weighs (L_TIM's parts all take λ_TIM; feature matching also its own weight).
LOSSES = {"tim": ("laviter_gen_loss", "laviter_kl_loss", "laviter_fm_loss"), "cap": ("laviter_cap_loss",),
          "fi": ("laviter_fi_loss",), "ft": ("laviter_ft_loss",),
          "vta": ("laviter_vta_word_loss", "laviter_vta_sentence_loss")}


def check_lambdas(lambdas: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(v) for v in lambdas)
    if len(values) != 5 or any(v < 0 for v in values) or not any(values):
        raise ValueError(f"LAViTeR lambdas must be five weights >= 0 (λ_TIM, λ_C, λ_FI, λ_FT, λ_VTA), not "
                         f"all 0; got {list(lambdas)}")
    tim, cap, fi, ft, _ = values
    if ft > 0 and cap == 0:
        raise ValueError("LAViTeR: λ_FT > 0 needs λ_C > 0 (L_FT reads the captioner's fake captions, which "
                         "only L_C trains)")
    if fi > 0 and tim == 0:
        raise ValueError("LAViTeR: λ_FI > 0 needs λ_TIM > 0 (L_FI reads the generator's regions; without the "
                         "adversarial loss nothing makes them regions)")
    return values


def loss_weights(lambdas: Sequence[float], feature_matching: float = 0.0) -> dict[str, float]:
    """Weight of every loss the task returns."""
    weights = {loss: lam for name, lam in zip(LAMBDA_NAMES, lambdas, strict=True) for loss in LOSSES[name]}
    weights["laviter_fm_loss"] = weights["laviter_fm_loss"] * feature_matching
    return weights


class LAViTeR(nn.Module):
    requires: tuple[str, ...] = ()

    def __init__(self, model: UniterModel, *, cls_id: int, sep_id: int, pad_id: int = 0,
                 lambdas: Sequence[float] = PAPER_LAMBDAS, embed_dim: int = 256,
                 gammas: Sequence[float] = GAMMAS, cls_sep: bool = False, caption_layers: int = 2,
                 caption_max_len: int = 64, generator_slots: int = 10, generator_layers: int = 2,
                 cond_dim: int = 100, noise_dim: int = 100, discriminator_layers: int = 2,
                 mismatch: bool = False, feature_matching: float = 0.0) -> None:
        super().__init__()
        self.lambdas = check_lambdas(lambdas)
        if feature_matching < 0:
            raise ValueError(f"LAViTeR feature_matching must be >= 0, got {feature_matching}")
        tim, cap, fi, ft, vta = self.lambdas
        config = model.config
        hidden, heads = config.hidden_size, config.num_attention_heads
        gamma1, gamma2, gamma3 = gammas
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.mismatch, self.feature_matching = mismatch, feature_matching
        self.vta = VTA(model, embed_dim=embed_dim, gamma1=gamma1, gamma2=gamma2, gamma3=gamma3,
                       cls_sep=cls_sep)
        self.captioner = None
        if cap > 0 or ft > 0:
            self.captioner = Captioner(hidden, config.vocab_size, bos_id=cls_id, eos_id=sep_id, pad_id=pad_id,
                                       layers=caption_layers, heads=heads, max_len=caption_max_len,
                                       dropout=config.hidden_dropout_prob,
                                       initializer_range=config.initializer_range)
        self.generator = self.discriminator = None
        if tim > 0 or fi > 0:
            self.generator = RegionGenerator(embed_dim, config.img_dim, slots=generator_slots, hidden=hidden,
                                             cond_dim=cond_dim, noise_dim=noise_dim, layers=generator_layers,
                                             heads=heads, initializer_range=config.initializer_range)
            self.discriminator = SetDiscriminator(config.img_dim, embed_dim, hidden=hidden,
                                                  layers=discriminator_layers, heads=heads,
                                                  initializer_range=config.initializer_range)

    @property
    def adversary(self) -> nn.Module | None:
        """The module the loop trains with its own optimizer (``discriminator_step``), None without TIM."""
        return self.discriminator

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        return batch

    def _damsm(self, text: TextFeatures, image: ImageFeatures, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.vta.losses(text, image, pos)
        return out["word"] + out["sentence"], out["hits"], out["count"]

    def forward(self, model: UniterModel, batch: dict) -> dict[str, Tensor]:
        tim, cap, fi, ft, vta = self.lambdas
        text, image = self.vta.batch_text(model, batch), self.vta.batch_image(model, batch)
        pos = positives(batch["img_keys"]).to(text.words.device)
        out: dict[str, Tensor] = {}
        if vta > 0:
            losses = self.vta.losses(text, image, pos)
            out |= {"laviter_vta_word_loss": losses["word"], "laviter_vta_sentence_loss": losses["sentence"],
                    "laviter_vta_correct": losses["hits"], "laviter_vta_count": losses["count"]}
        if self.captioner is not None:
            caption, logits = self.captioner(image.hidden, image.region_mask, batch["input_ids"],
                                             batch["txt_mask"], name="laviter_cap")
            if cap > 0:
                out |= caption
            if ft > 0:
                target_mask = batch["txt_mask"].bool()[:, 1:]
                ids, positions, mask = fake_captions(logits.detach().argmax(-1), target_mask, self.cls_id,
                                                     self.sep_id, self.pad_id)
                fake_text = self.vta.text_features(model, ids, positions, mask)
                out["laviter_ft_loss"], out["laviter_ft_correct"], out["laviter_ft_count"] = self._damsm(
                    fake_text, image, pos)
        if self.generator is not None:
            fake = self.generator(text.sentence, text.words, text.word_mask)
            condition = text.sentence.detach()
            fake_u, fake_c, fake_h = frozen(self.discriminator, fake.features, fake.boxes, fake.mask,
                                            condition)
            out["laviter_gen_loss"] = generator_loss(fake_u, fake_c)
            out["laviter_kl_loss"] = kl_loss(fake.mu, fake.logvar)
            with torch.no_grad():
                real_u, _, real_h = self.discriminator(batch["img_feat"], batch["img_pos_feat"],
                                                       batch["img_mask"], condition)
            if self.feature_matching > 0:
                out["laviter_fm_loss"] = feature_matching_loss(real_h, fake_h)
            # The discriminator's unconditional accuracy on this batch's real and generated sets.
            out["laviter_d_correct"] = ((real_u > 0).sum() + (fake_u.detach() < 0).sum()).detach()
            out["laviter_d_count"] = torch.tensor(2 * real_u.numel(), device=real_u.device)
            if fi > 0:
                fake_image = self.vta.image_features(model, fake.features, fake.boxes, fake.mask)
                out["laviter_fi_loss"], out["laviter_fi_correct"], out["laviter_fi_count"] = self._damsm(
                    text, fake_image, pos)
        return out

    def discriminator_step(self, model: UniterModel, batch: dict) -> dict[str, Tensor]:
        """L_D (``laviter_disc_loss``) of this batch: real regions against regions generated now (no gradient
        reaches the encoder, the projections or the generator)."""
        if self.discriminator is None:
            raise ValueError("LAViTeR: no discriminator (λ_TIM = λ_FI = 0)")
        with torch.no_grad():
            text = self.vta.batch_text(model, batch)
            fake = self.generator(text.sentence, text.words, text.word_mask)
        sentence = text.sentence
        real_u, real_c, _ = self.discriminator(batch["img_feat"], batch["img_pos_feat"], batch["img_mask"],
                                               sentence)
        fake_u, fake_c, _ = self.discriminator(fake.features, fake.boxes, fake.mask, sentence)
        wrong = None
        if self.mismatch:
            other, differ = mismatched(sentence, batch["img_keys"])
            if bool(differ.any()):
                _, wrong_c, _ = self.discriminator(batch["img_feat"], batch["img_pos_feat"],
                                                   batch["img_mask"], other)
                wrong = wrong_c[differ]
        loss = discriminator_loss(real_u, real_c, fake_u, fake_c, wrong)
        correct = (real_u > 0).sum() + (fake_u < 0).sum() + (real_c > 0).sum() + (fake_c < 0).sum()
        return {"laviter_disc_loss": loss, "laviter_disc_correct": correct.detach(),
                "laviter_disc_count": torch.tensor(4 * real_u.numel(), device=real_u.device)}

    @torch.no_grad()
    def caption(self, model: UniterModel, batch: dict, max_len: int | None = None, beam_size: int = 1,
                length_penalty: float = 0.0) -> list[list[int]]:
        """Token ids of a caption for each image of ``batch`` (img_feat, img_pos_feat, img_mask)."""
        if self.captioner is None:
            raise ValueError("LAViTeR: no captioner (λ_C = λ_FT = 0)")
        image = self.vta.batch_image(model, batch)
        return self.captioner.generate(image.hidden, image.region_mask, max_len, beam_size, length_penalty)
