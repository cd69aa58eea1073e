"""The tokens a sparse encoder kept, as transparent PNG overlays for the web page: one per encoder
layer, each kept cell filled in its level's colour (the data ``sparsedet viz`` draws, from the
model's own ``TokenSelection``)."""
from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw

from ..tools.draw import PALETTE
from ..tools.viz import cell_boxes, observe, token_cells, updated_tokens

OPACITY = 120  # of a kept cell, out of 255: the photo shows through


def kept_tokens(model, image: Image.Image) -> dict:
    """{"layers": [{"layer", "kept", "png"}...], "valid_tokens", "levels": [[h, w]...]} for ``image``
    through ``model`` (a ``Detector``); each "png" a data URL of the image's size (as the model saw it,
    resized: the page stretches it over the photo)."""
    obs = observe(model, image)
    valid = int((~obs.padding).sum())
    layers = []
    for layer in range(model.config.num_encoder_layers):
        cells = token_cells(updated_tokens(obs, layer), obs.shapes)
        overlay = Image.new("RGBA", obs.image.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        for level in reversed(range(len(obs.shapes))):  # the fine levels' small cells on top
            for box in cell_boxes(cells[level], obs.shapes[level], obs.padded_size):
                draw.rectangle(box, fill=PALETTE[level % len(PALETTE)] + (OPACITY,))
        buffer = io.BytesIO()
        overlay.save(buffer, format="PNG")
        layers.append({"layer": layer, "kept": sum(len(c) for c in cells),
                       "png": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()})
    return {"layers": layers, "valid_tokens": valid, "levels": [list(s) for s in obs.shapes]}
