"""Named worlds for tests. The tiny and demo worlds are configs (``configs/tiny.yaml``, the defaults).

``micro`` is the smallest world that still has every dataset, task set and split (NLVR2 with both
labels), every planted overlap kind and every fault kind: one of each where the config allows it.
"""

from __future__ import annotations

from worldgen.config import WorldConfig, WorldFaults, WorldOverlaps, WorldSizes


def micro(seed: int = 0) -> WorldConfig:
    return WorldConfig(
        seed=seed,
        image_min_side=64,
        image_max_side=64,
        sizes=WorldSizes(
            coco_train2014=6,  # 4 RefCOCO images + 1 planted Flickr30k photo + 1 shared with VG
            coco_val2014=3,  # Karpathy val, test and one restval
            karpathy_coco_val=1,
            karpathy_coco_test=1,
            refcoco_train=1,
            refcoco_val=1,
            refcoco_testA=1,
            refcoco_testB=1,
            vg=5,
            vg_with_coco=1,
            cc_train=4,
            cc_val=1,
            sbu=3,
            flickr30k_train=1,
            flickr30k_val=1,
            flickr30k_test=1,
            karpathy_flickr30k_val=1,
            karpathy_flickr30k_test=1,
            snli_ve_dev=1,
            nlvr2_train=2,  # pairs: one True and one False statement per split
            nlvr2_dev=2,
            nlvr2_test1=2,
        ),
        overlaps=WorldOverlaps(
            coco_flickr=1, vg_coco=1, vg_flickr=1, sbu_flickr=1, cc_content_hash=1, cc_url=1
        ),
        # One image per fault: 3 CC + 2 SBU + 3 VG images are left once the overlaps are planted.
        faults=WorldFaults(
            not_found=1,
            flaky_500=1,
            slow=1,
            truncated=1,
            not_image=1,
            bomb=1,
            huge=1,
            redirect_loop=1,
            slow_seconds=2.0,  # above the tests' 1 s download timeout
            huge_bytes=3_000_000,  # above the tests' 2 MB size cap
        ),
    )
