"""Data parallelism: a batch split over two (forced host) devices gives exactly the codes of one
device. Runs in a subprocess because the device count is fixed when JAX starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from dalle_app import runtime
    from dalle_app.models.dallebart import load_dallebart
    from dalle_app.models.vqgan import VQGANConfig, build_vqgan, init_params, VQGAN
    from dalle_app.pipeline import DallePipeline, image_rows
    from dalle_app.request import GenerationRequest, SamplingSettings
    from dalle_app.text import TextProcessor

    runtime.configure(cache_dir=False)
    assert len(jax.local_devices()) == 2, jax.local_devices()
    folder = "tests/fixtures/reference/dallebart_tiny_b_scanned"
    config = VQGANConfig(ch=32, num_res_blocks=1, resolution=20, z_channels=8, ch_mult=(1, 2, 2),
                         attn_resolutions=(), n_embed=100, embed_dim=8)
    module = build_vqgan(config)
    vqgan = VQGAN(config, module, init_params(module, jax.random.PRNGKey(0)))

    def pipeline(devices):
        return DallePipeline(load_dallebart(folder), TextProcessor.from_pretrained(folder), vqgan,
                             devices=devices)

    sharded, single = pipeline(None), pipeline(jax.local_devices()[:1])
    assert sharded.sampler.num_devices == 2 and single.sampler.num_devices == 1
    def row(prompt, negative="", seed=0, **sampling):
        request = GenerationRequest(prompt, negative, num_images=1, seed=seed, sampling=SamplingSettings(**sampling))
        return image_rows(request)[0]

    rows = [row("a cat", seed=1), row("a dog", "blurry", seed=2, top_k=5),
            row("a cat", seed=3, top_p=0.8, temperature=0.7)]
    for n in (3,):
        a, _ = sharded.generate_codes(rows[:n])
        b, _ = single.generate_codes(rows[:n])
        np.testing.assert_array_equal(a, b)
    print("SHARDED-OK")
""")


def test_sharded_equals_single_device() -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
