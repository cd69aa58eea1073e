"""Shared pieces of the Hugging Face parity tests: perturbed random models, padded batches, comparison."""
import torch
from ties import follow_fixture, picks_by_value

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def perturb(model: torch.nn.Module) -> None:
    """Move every weight and buffer off its structured init (zero offsets, identity batch norm),
    so that a swapped or misplaced tensor changes the outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(1.0 + 0.5 * torch.rand(t.shape, generator=gen))
            elif "sampling_offsets" in name or "attention_weights" in name:
                t.add_(noise * (0.5 if name.endswith("bias") else 0.02))
            else:
                t.add_(noise * 0.02)


def padded_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 128x160 images, the second one 96x112 padded bottom/right (zero on padding, as Batch)."""
    images = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(2, 128, 160, dtype=torch.bool)
    mask[1, 96:, :] = True
    mask[1, :, 112:] = True
    return images.masked_fill(mask[:, None], 0.0), mask


def compare(hf, model, images, mask):
    from sparsedet.data.batch import Batch

    pixel_values = ((images - MEAN) / STD).masked_fill(mask[:, None], 0.0)  # HF pads after normalising
    with torch.no_grad():
        expected = hf(pixel_values=pixel_values, pixel_mask=(~mask).long())
        if getattr(expected, "enc_outputs_class", None) is not None:  # two-stage: proposals ranked by class 0
            first = lambda logits: logits[..., 0]  # noqa: E731
            k = model.queries.num_queries
            top = expected.enc_outputs_class[..., 0].sort(dim=1, descending=True, stable=True).indices[:, :k]
            picked = expected.enc_outputs_class.gather(1, top[..., None].expand(-1, -1, expected.logits.shape[-1]))
            model.queries.select = follow_fixture(model.queries.select, picks_by_value(picked, first), first)
        try:
            out = model(Batch(images, mask))
        finally:
            model.queries.__dict__.pop("select", None)  # the model may be shared with other tests
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.boxes, expected.pred_boxes, rtol=1e-4, atol=1e-4)
