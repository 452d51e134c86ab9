"""Models for `make bench`: the embedded tiny policy (~0.85M parameters) and a ~30M-parameter Qwen2.5-VL.

The 30M model is randomly initialised with our builder (noisyrollout.models.tiny.build_model) around the tokenizer and
processor of the tiny model, so every prompt tokenizes (and every image is resized and patched) identically on both
sizes; only the network is bigger. Its weights are random: a benchmark measures speed, not what the model says.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from noisyrollout.config import TinyModelConfig

DEFAULT_BASE = Path("runs/embedded/sft/model")

# ~30M parameters: the text decoder holds nearly all of them (8 x 3.5M + a 0.5M tied embedding); the vision tower
# stays small (its merger projects to the decoder width), as the images are 56 x 56 = 4 image tokens.
BENCH_CONFIGS: dict[str, TinyModelConfig] = {
    "30m": TinyModelConfig(
        hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        vision_depth=2, vision_hidden_size=128, vision_intermediate_size=512, vision_num_heads=4,
    ),
}


def count_parameters(model) -> int:
    """Parameters of `model`, a tied embedding / LM head counted once."""
    return sum(p.numel() for p in model.parameters())


def build_bench_model(out_dir: Path, size: str = "30m", base_dir: Path = DEFAULT_BASE) -> Path:
    """The model folder for `size`: "tiny" is `base_dir` itself; "30m" is built into `out_dir` (model + processor,
    saved with save_pretrained; the tokenizer and processor are `base_dir`'s) and returned."""
    from noisyrollout.models.load import load_model, load_processor
    from noisyrollout.models.tiny import build_model

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if size == "tiny":
        model = load_model(base_dir)
        print(f"tiny: {base_dir} ({count_parameters(model):,} parameters)")
        return base_dir
    if size not in BENCH_CONFIGS:
        raise ValueError(f"unknown bench model size {size!r}; expected 'tiny' or one of {sorted(BENCH_CONFIGS)}")
    cfg = BENCH_CONFIGS[size]
    processor = load_processor(base_dir)
    # Patch geometry must match the copied image processor, or image tokens and features would not line up.
    image_processor = processor.image_processor
    if (image_processor.patch_size, image_processor.merge_size) != (cfg.patch_size, cfg.spatial_merge_size):
        raise ValueError(f"{base_dir}: processor patch/merge size {image_processor.patch_size}/"
                         f"{image_processor.merge_size} differ from the bench config's "
                         f"{cfg.patch_size}/{cfg.spatial_merge_size}")
    model = build_model(cfg, processor.tokenizer, seed=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    print(f"{size}: {out_dir} ({count_parameters(model):,} parameters)")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a bench model (prints its folder and parameter count).")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--size", default="30m", choices=["tiny", *BENCH_CONFIGS])
    parser.add_argument("--base-dir", type=Path, default=DEFAULT_BASE)
    args = parser.parse_args()
    build_bench_model(args.out_dir, args.size, args.base_dir)


if __name__ == "__main__":
    main()
