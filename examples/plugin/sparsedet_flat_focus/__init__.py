from sparsedet import presets
from sparsedet.models.encoders import register_encoder
from sparsedet.models.encoders.focus import FocusEncoder
from sparsedet.models.encoders.scoring import top_share


@register_encoder("flat_focus")
class FlatFocusEncoder(FocusEncoder):  # Focus-DETR's scorer, loss and dual attention
    def select(self, level_logits, ranking, levels):
        top = top_share(ranking, levels.padding, self.keep_ratio, plus_one=True)
        return [top] * len(self.layers)  # one token set for every layer


@presets.register_preset
def flat_focus_detr_tiny():
    config = presets.focus_detr_tiny()
    config.model.encoder.kind = "flat_focus"
    return config
