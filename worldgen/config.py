"""Config of the synthetic world (the embedded default's miniature internet).

Defaults are the demo world (about 2,600 images); ``configs/tiny.yaml`` sets a small one for smoke runs
and ``worldgen.presets.micro()`` the smallest for unit tests.
Every count is exact: the world publishes exactly these many records, plants exactly these many
overlaps and injects exactly these many faults, and records them in ``truth.json``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

FAULT_NAMES = ("not_found", "flaky_500", "slow", "truncated", "not_image", "bomb", "huge", "redirect_loop")


class WorldSizes(BaseModel):
    """Images (or NLVR2 pairs, CC rows, SBU lines) per dataset and split."""

    model_config = ConfigDict(extra="forbid")

    coco_train2014: int = Field(280, ge=1)
    coco_val2014: int = Field(120, ge=2)
    karpathy_coco_val: int = Field(40, ge=1)  # drawn from val2014; the rest of val2014 is "restval"
    karpathy_coco_test: int = Field(40, ge=1)
    # RefCOCO images (all COCO train2014, split by image as in the UNC release)
    refcoco_train: int = Field(60, ge=1)
    refcoco_val: int = Field(10, ge=1)
    refcoco_testA: int = Field(10, ge=1)
    refcoco_testB: int = Field(10, ge=1)
    vg: int = Field(300, ge=1)
    vg_with_coco: int = Field(50, ge=0)  # VG images that are also (non-eval) COCO images: kept by dedup
    cc_train: int = Field(540, ge=1)
    cc_val: int = Field(60, ge=1)
    sbu: int = Field(300, ge=1)
    # Flickr30k images by Flickr30k Entities split (real photo ids drawn from the real split lists)
    flickr30k_train: int = Field(240, ge=1)
    flickr30k_val: int = Field(30, ge=1)
    flickr30k_test: int = Field(30, ge=1)
    karpathy_flickr30k_val: int = Field(30, ge=1)  # Karpathy splits are drawn independently of Entities
    karpathy_flickr30k_test: int = Field(30, ge=1)
    snli_ve_dev: int = Field(30, ge=1)  # Flickr30k images (not Entities test) whose pairs form SNLI-VE dev
    nlvr2_train: int = Field(140, ge=1)  # image pairs (two images each)
    # 100 statements per evaluation split: at 30, one statement is 3.3 points and a single hard draw (six
    # counting statements in dev) decided whether pretrained beat scratch.
    nlvr2_dev: int = Field(100, ge=1)
    nlvr2_test1: int = Field(100, ge=1)
    # GQA (published only when download.datasets configures it: configs/gqa.yaml). Train and val images are
    # Visual Genome images (neither planted nor faulty); testdev images are GQA's own ("n<digits>").
    gqa_train: int = Field(150, ge=1)
    gqa_val: int = Field(40, ge=1)
    gqa_testdev: int = Field(30, ge=1)


class WorldOverlaps(BaseModel):
    """Pretraining images planted to collide with evaluation images (each must be removed by dedup)."""

    model_config = ConfigDict(extra="forbid")

    coco_flickr: int = Field(8, ge=0)  # COCO train2014 images whose flickr_url is a Flickr30k photo
    vg_coco: int = Field(8, ge=0)  # VG images whose coco_id is a blocked COCO eval image
    vg_flickr: int = Field(8, ge=0)  # VG images whose flickr_id is a Flickr30k photo
    sbu_flickr: int = Field(8, ge=0)  # SBU lines whose URL is a Flickr30k photo
    cc_content_hash: int = Field(8, ge=0)  # CC rows serving the exact bytes of an eval image
    cc_url: int = Field(6, ge=0)  # CC rows whose URL is an NLVR2 dev image URL up to normalization


class WorldFaults(BaseModel):
    """Mirror faults injected on CC, SBU and non-planted VG images (see worldgen/mirror.py)."""

    model_config = ConfigDict(extra="forbid")

    not_found: int = Field(3, ge=0)
    flaky_500: int = Field(3, ge=0)
    slow: int = Field(2, ge=0)
    truncated: int = Field(3, ge=0)
    not_image: int = Field(3, ge=0)
    bomb: int = Field(2, ge=0)
    huge: int = Field(2, ge=0)
    redirect_loop: int = Field(2, ge=0)
    slow_seconds: float = Field(6.0, gt=0)  # above download.timeout_s, so a slow image times out
    huge_bytes: int = Field(20_000_000, gt=0)  # above download.max_bytes, so a huge body is refused

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in FAULT_NAMES}


class WorldConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    image_min_side: int = Field(96, ge=64)
    image_max_side: int = Field(192, ge=64)
    jpeg_quality: int = Field(90, ge=50, le=100)
    captions_per_image: int = Field(5, ge=1, le=10)  # COCO and Flickr30k (CC and SBU have one)
    vqa_questions_per_image: int = Field(3, ge=1, le=20)
    gqa_questions_per_image: int = Field(6, ge=1, le=20)  # balanced questions per GQA image (fewer if the
    # scene cannot yield that many distinct ones)
    sizes: WorldSizes = Field(default_factory=WorldSizes)
    overlaps: WorldOverlaps = Field(default_factory=WorldOverlaps)
    faults: WorldFaults = Field(default_factory=WorldFaults)

    @model_validator(mode="after")
    def _counts_fit(self) -> WorldConfig:
        s, o = self.sizes, self.overlaps
        checks = [
            (self.image_min_side <= self.image_max_side, "image_min_side must be <= image_max_side"),
            (
                s.karpathy_coco_val + s.karpathy_coco_test < s.coco_val2014,
                "sizes.karpathy_coco_val + karpathy_coco_test must leave restval images in coco_val2014",
            ),
            (
                self.refcoco_images + o.coco_flickr + s.vg_with_coco <= s.coco_train2014,
                "sizes.refcoco_* + overlaps.coco_flickr + sizes.vg_with_coco must fit in coco_train2014",
            ),
            (
                o.vg_coco <= s.karpathy_coco_val + s.karpathy_coco_test + self.refcoco_eval_images,
                "overlaps.vg_coco exceeds the blocked COCO eval images",
            ),
            (
                s.vg_with_coco + o.vg_coco + o.vg_flickr <= s.vg,
                "sizes.vg_with_coco + overlaps.vg_coco + overlaps.vg_flickr must fit in sizes.vg",
            ),
            (o.cc_content_hash + o.cc_url <= s.cc_train + s.cc_val, "overlaps.cc_* must fit in the CC rows"),
            (o.cc_url <= 2 * s.nlvr2_dev, "overlaps.cc_url exceeds the NLVR2 dev images"),
            (o.sbu_flickr <= s.sbu, "overlaps.sbu_flickr must fit in sizes.sbu"),
            (
                s.karpathy_flickr30k_val + s.karpathy_flickr30k_test < self.flickr30k_images,
                "sizes.karpathy_flickr30k_* must leave Karpathy train images",
            ),
            (
                s.snli_ve_dev < s.flickr30k_train + s.flickr30k_val,
                "sizes.snli_ve_dev must leave SNLI-VE train images",
            ),
            (
                sum(self.faults.counts().values()) <= self.fault_candidates,
                "faults exceed the CC, SBU and non-planted VG images they can be injected on",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    @property
    def refcoco_eval_images(self) -> int:
        return self.sizes.refcoco_val + self.sizes.refcoco_testA + self.sizes.refcoco_testB

    @property
    def refcoco_images(self) -> int:
        return self.sizes.refcoco_train + self.refcoco_eval_images

    @property
    def flickr30k_images(self) -> int:
        return self.sizes.flickr30k_train + self.sizes.flickr30k_val + self.sizes.flickr30k_test

    @property
    def fault_candidates(self) -> int:
        s, o = self.sizes, self.overlaps
        return (
            (s.cc_train + s.cc_val - o.cc_content_hash - o.cc_url)
            + (s.sbu - o.sbu_flickr)
            + (s.vg - o.vg_coco - o.vg_flickr)
        )
