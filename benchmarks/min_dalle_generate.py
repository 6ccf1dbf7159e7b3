"""Time min-dalle (`min-dalle==0.4.11`, PyTorch) at DALL·E Mega or Mini size with random weights.

min-dalle downloads its weights and tokenizer when it is constructed. This script builds its
encoder, decoder and VQGAN detokenizer directly instead, with random weights (normal, std 0.02,
as our own benchmark's; the values do not matter for timing), on the GPU, and times its own
`generate_images` (text encoding, the 256 decoding steps, the VQGAN decode) for a grid of
images. Same settings as `generate.py`: condition scale 10, top-k 50, temperature 1.

    python benchmarks/min_dalle_generate.py --size mega --grid 3 --dtype bfloat16 --repeats 3

It needs PyTorch with CUDA and the `min-dalle` and `emoji` packages (benchmarks/README.md says
how to bring them to a machine without network access). Progress goes to stderr; each grid's
stdout line is one JSON object: images, total_s (best of --repeats), first_call_s, and the settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from min_dalle import MinDalle
from min_dalle.models import DalleBartDecoder, DalleBartEncoder, VQGanDetokenizer

SIZES = {  # min-dalle's own constants for each checkpoint
    "mega": dict(layer_count=24, attention_head_count=32, embed_count=2048, glu_embed_count=4096,
                 text_vocab_count=50272, image_vocab_count=16415),
    "mini": dict(layer_count=12, attention_head_count=16, embed_count=1024, glu_embed_count=2730,
                 text_vocab_count=50264, image_vocab_count=16384),
}
if not hasattr(torch.cuda.amp, "autocast"):  # min-dalle uses the older spelling of torch.autocast("cuda")
    torch.cuda.amp.autocast = lambda dtype=None: torch.autocast("cuda", dtype=dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_TOKENS = [0] + list(range(100, 112)) + [2]  # 12 tokens between BOS and EOS, like generate.py's prompt


class FixedTokens:
    """Stands in for min-dalle's BPE tokenizer (whose vocabulary it would download): token ids are
    all the model sees."""

    def tokenize(self, text: str, is_verbose: bool = False) -> list[int]:
        return list(TEXT_TOKENS)


def random_min_dalle(size: str, dtype: torch.dtype, device: str, layers: int | None) -> MinDalle:
    """A MinDalle with random weights, made on `device` without touching its download code."""
    model = MinDalle.__new__(MinDalle)
    sizes = dict(SIZES[size], **({"layer_count": layers} if layers else {}))
    model.__dict__.update(device=device, is_mega=size == "mega", is_reusable=True, dtype=dtype,
                          is_verbose=False, text_token_count=64, **sizes)
    model.tokenizer = FixedTokens()
    with torch.device(device):
        model.encoder = DalleBartEncoder(
            layer_count=sizes["layer_count"], embed_count=sizes["embed_count"],
            attention_head_count=sizes["attention_head_count"], text_vocab_count=sizes["text_vocab_count"],
            text_token_count=64, glu_embed_count=sizes["glu_embed_count"], device=device)
        model.decoder = DalleBartDecoder(
            image_vocab_count=sizes["image_vocab_count"], embed_count=sizes["embed_count"],
            attention_head_count=sizes["attention_head_count"], glu_embed_count=sizes["glu_embed_count"],
            layer_count=sizes["layer_count"], device=device)
        model.detokenizer = VQGanDetokenizer()
    for module in (model.encoder, model.decoder):
        for parameter in module.parameters():
            if parameter.dim() >= 2:
                torch.nn.init.normal_(parameter, std=0.02)
    model.encoder = model.encoder.to(dtype).eval()
    model.decoder = model.decoder.to(dtype).eval()
    model.detokenizer = model.detokenizer.eval()
    return model


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed_call(model: MinDalle, grid: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    images = model.generate_images(text="a prompt", seed=1, grid_size=grid, top_k=50, temperature=1,
                                   supercondition_factor=10, is_seamless=False)
    images.cpu()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="mega")
    parser.add_argument("--grid", type=int, nargs="+", default=[3], help="grid side: 3 gives 9 images")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (smoke runs only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("min-dalle's generation code calls torch.cuda: run this on a machine with a CUDA GPU")
    t = time.perf_counter()
    model = random_min_dalle(args.size, DTYPES[args.dtype], "cuda", args.layers)
    torch.cuda.synchronize()
    log(f"random min-dalle {args.size} ({args.dtype}) made in {time.perf_counter() - t:.1f}s on "
        f"{torch.cuda.get_device_name()}")
    for grid in args.grid:
        first = timed_call(model, grid)
        runs = [timed_call(model, grid) for _ in range(args.repeats)]
        log(f"{grid * grid} image(s): first call {first:.2f}s, then " + ", ".join(f"{r:.2f}s" for r in runs))
        print(json.dumps({"implementation": "min-dalle 0.4.11", "size": args.size, "dtype": args.dtype,
                          "device": torch.cuda.get_device_name(), "layers": model.layer_count,
                          "images": grid * grid, "repeats": args.repeats, "first_call_s": round(first, 3),
                          "total_s": round(min(runs), 3), "images_per_s": round(grid * grid / min(runs), 2)}),
              flush=True)


if __name__ == "__main__":
    main()
