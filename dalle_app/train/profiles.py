"""Model sizes, batch sizes and step counts for each kind of machine (`--profile`).

- `cpu`: tanh GELU in DalleBart, 4400 steps, fine-tunes of 400: about 3.6 hours for one `all`
  run on a 2-core AMD EPYC without AVX-512 (docs/embedded-model.md, Time). The shipped assets
  came from the recipe before it (exact GELU, 3500 steps, fine-tunes of 500).
  `--minutes-budget 90` scales the step counts down to 90 minutes on any machine.
- `gpu`: one modern GPU for a few minutes: bigger models, batches and dataset.
- `tiny`: seconds-long runs for the tests.

`budget_shares` split `--minutes-budget` between the phases; DalleBart, the part the prompt
quality depends on, gets the most.
"""

from __future__ import annotations

import dataclasses

from dalle_app.models.vqgan import VQGANConfig
from dalle_app.train.clip_training import CLIPTrainConfig
from dalle_app.train.dallebart_training import DalleBartTrainConfig
from dalle_app.train.vqgan_training import VQGANTrainConfig, default_model_config


@dataclasses.dataclass(frozen=True)
class Profile:
    vqgan_model: VQGANConfig
    vqgan: VQGANTrainConfig
    clip: CLIPTrainConfig
    dallebart: DalleBartTrainConfig
    dallebart_outline: DalleBartTrainConfig  # outline-weighted fine-tunes of DalleBart, averaged (finetunes, base_share)
    vqgan_decoder: VQGANTrainConfig  # decoder-only fine-tuning after DalleBart (codes unchanged)
    max_text_length: int = 24
    tokenizer_captions: int = 20_000
    tokenizer_vocab_size: int = 512
    workers: int = 0  # processes rendering scenes ahead of the steps (0: in the training process)
    budget_shares: tuple[tuple[str, float], ...] = (
        ("vqgan", 0.15), ("clip", 0.1), ("dallebart", 0.53), ("dallebart-outline", 0.1), ("vqgan-decoder", 0.12))


PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        vqgan_model=default_model_config(),
        vqgan=VQGANTrainConfig(steps=1000, batch_size=8),  # + 8 mosaics per step (locality loss)
        clip=CLIPTrainConfig(steps=2000, batch_size=96, analogies=8),
        dallebart=DalleBartTrainConfig(steps=4400, batch_size=32, num_samples=60_000, activation="gelu_new"),
        dallebart_outline=DalleBartTrainConfig(steps=400, batch_size=32, lr=3e-4, warmup=50, outline_weight=4.0,
                                               finetunes=3, base_share=0.5, save_every=100),
        vqgan_decoder=VQGANTrainConfig(steps=300, batch_size=16, lr=5e-4, warmup=50),
        budget_shares=(("vqgan", 0.1), ("clip", 0.17), ("dallebart", 0.53), ("dallebart-outline", 0.15),
                       ("vqgan-decoder", 0.05)),
    ),
    "gpu": Profile(
        vqgan_model=VQGANConfig(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=64,
                                z_channels=32, n_embed=64, embed_dim=16),  # f4, like the cpu one
        vqgan=VQGANTrainConfig(steps=3000, batch_size=64, lr=1e-3, restart_every=100, save_every=500, log_every=100),
        clip=CLIPTrainConfig(steps=1500, batch_size=256, width=128, layers=4, analogies=16, save_every=500,
                             log_every=100),
        dallebart=DalleBartTrainConfig(steps=6000, batch_size=256, lr=1e-3, warmup=300, num_samples=200_000,
                                       save_every=1000, log_every=100, d_model=256, encoder_layers=3,
                                       decoder_layers=4, heads=8),
        dallebart_outline=DalleBartTrainConfig(steps=500, batch_size=256, lr=3e-4, warmup=50, outline_weight=4.0,
                                               finetunes=3, base_share=0.5, save_every=250, log_every=50),
        workers=12,
        tokenizer_captions=5_000,
        vqgan_decoder=VQGANTrainConfig(steps=1000, batch_size=64, lr=5e-4, warmup=100, save_every=500, log_every=100),
        budget_shares=(("vqgan", 0.2), ("clip", 0.1), ("dallebart", 0.5), ("dallebart-outline", 0.1),
                       ("vqgan-decoder", 0.1)),
    ),
    "tiny": Profile(
        vqgan_model=VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=0, attn_resolutions=(), resolution=64,
                                z_channels=32, n_embed=32, embed_dim=8),
        vqgan=VQGANTrainConfig(steps=6, batch_size=4, warmup=2, init_codebook_at=1, restart_every=2, save_every=3,
                               log_every=3, eval_images=8, min_color_purity=0.0),
        clip=CLIPTrainConfig(steps=6, batch_size=8, warmup=2, save_every=3, log_every=3, width=32, layers=1,
                             eval_images=8, analogies=2),
        dallebart=DalleBartTrainConfig(steps=6, batch_size=8, warmup=2, num_samples=64, eval_samples=64,
                                       save_every=3, log_every=3, d_model=32, encoder_layers=1, decoder_layers=1,
                                       heads=2, activation="gelu_new"),
        dallebart_outline=DalleBartTrainConfig(steps=4, batch_size=8, warmup=1, outline_weight=4.0, finetunes=2,
                                               base_share=0.5, save_every=2, log_every=2),
        vqgan_decoder=VQGANTrainConfig(steps=6, batch_size=4, warmup=2, save_every=3, log_every=3, eval_images=8),
        max_text_length=16,
        tokenizer_captions=500,
        tokenizer_vocab_size=300,
    ),
}
