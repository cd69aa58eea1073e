"""Class tables: which dataset category each logit column predicts.

A model's config carries ``classes`` (a name per logit column) and ``category_ids`` (the dataset
category id per column). Released COCO models use one of two tables:

* 91 columns indexed by the raw COCO category id (DETR, Deformable DETR, DINO, Sparse DETR,
  Salience DETR, Conditional DETR, SAM-DETR). Ids 0, 12, 26, 29, 30, 45, 66, 68, 69, 71 and 83 name
  no category in COCO 2017; their columns are named ``UNUSED``, never predicted and never scored.
* 80 contiguous columns in category-id order (detectron2, hence Focus-DETR).
"""
from __future__ import annotations

UNUSED = "N/A"  # name of a logit column that predicts no category (the convention of DETR and HF)

# COCO 2017 detection categories: (id, name), in id order.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)


def coco_class_table(num_columns: int) -> tuple[list[str], list[int]] | None:
    """(names, category ids) of a COCO model with ``num_columns`` logits: 91 raw ids or 80 contiguous;
    None for any other count."""
    if num_columns == 80:
        return [name for _, name in COCO_CATEGORIES], [i for i, _ in COCO_CATEGORIES]
    if num_columns == 91:
        names = dict(COCO_CATEGORIES)
        return [names.get(i, UNUSED) for i in range(91)], list(range(91))
    return None


def raw_id_table(names: list[str], unused: str = UNUSED) -> tuple[list[str], list[int]]:
    """Table of a model whose column i predicts category id i (the official DETR repos' convention
    for custom data); columns named ``unused`` predict nothing."""
    return [UNUSED if name == unused else name for name in names], list(range(len(names)))


def unused_columns(classes: list[str]) -> list[int]:
    """Indices of the logit columns that predict no category."""
    return [i for i, name in enumerate(classes) if name == UNUSED]


def column_categories(classes: list[str], category_ids: list[int]) -> list[int | None]:
    """Dataset category id per logit column; None for an unused column."""
    unused = set(unused_columns(classes))
    return [None if i in unused else c for i, c in enumerate(category_ids)]
