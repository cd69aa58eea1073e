"""Detection drawings: labels stay inside the image and off each other."""
import torch
from PIL import Image

from sparsedet.tools.draw import PALETTE, draw_detections, place_labels


def _inside(corner, size, image_size):
    (x, y), (w, h), (width, height) = corner, size, image_size
    return 0 <= x and 0 <= y and x + w <= width and y + h <= height


def _apart(a, b, size):
    return abs(a[0] - b[0]) >= size[0] or abs(a[1] - b[1]) >= size[1]


def test_labels_are_moved_inside_the_image():
    size, image = (30, 10), (100, 80)
    boxes = [[20, 30, 60, 70],    # room above: the label sits on the box's top edge, outside it
             [-5, 0, 40, 20],     # at the top-left corner: inside the box's top
             [90, 40, 120, 79]]   # over the right edge: pulled left to fit
    corners = place_labels(boxes, [size] * 3, image)
    assert corners == [(20, 20), (0, 0), (70, 30)]
    assert all(_inside(c, size, image) for c in corners)


def test_labels_of_boxes_sharing_a_corner_do_not_overlap():
    size, image = (30, 10), (100, 80)
    boxes = [[10, 30, 50, 60], [10, 30, 60, 70], [10, 30, 45, 65]]
    corners = place_labels(boxes, [size] * 3, image)
    assert corners == [(10, 20), (10, 30), (10, 65)]  # above, inside the top, below the third box
    assert all(_apart(a, b, size) for i, a in enumerate(corners) for b in corners[i + 1:])
    # Five labels at one corner have four spots: the fifth takes the spot it overlaps least.
    crowded = place_labels([[10, 30, 50, 60]] * 5, [size] * 5, image)
    assert len(set(crowded)) == 4 and crowded[4] in crowded[:4]


def test_a_label_at_the_right_edge_is_drawn_inside_the_picture():
    picture = draw_detections(Image.new("RGB", (64, 48)), {"boxes": torch.tensor([[50.0, 0.0, 63.0, 20.0]]),
                                                           "labels": torch.tensor([0]), "scores": torch.tensor([0.9])},
                              ["cat"])
    row = [picture.getpixel((x, 0)) for x in range(64)]
    assert row[63] == PALETTE[0] and row.index(PALETTE[0]) < 50  # the label ends at the edge, begins left of the box
