"""Overrides that make a preset small enough to train a few steps in seconds on a CPU."""

TINY = ["train.max_steps=2", "train.batch_size=2", "model.num_queries=20", "model.dn_queries=6",
        "model.num_encoder_layers=1", "model.num_decoder_layers=1", "model.hidden_dim=64", "model.ffn_dim=64",
        "model.backbone.width=8", "model.eval_size=96", "model.eval_max_size=128", "data.train_scales=[96]",
        "data.max_size=128", "train.precision=fp32"]
