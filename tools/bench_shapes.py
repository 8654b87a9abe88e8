"""The model shapes and training steps of experiments/bench.cpp's configs, for its Python tools.

bench.cpp holds the C++ side (model_preset dims, batch_seq); tools/torch_bench.py and
tools/ab_steps.py both read these, so the two tools time the same shapes.
"""

CONFIGS = {
    "small": dict(vocab=256, d_model=256, layers=4, heads=4, d_ff=1024, seq=128, batch=16),
    "medium": dict(vocab=256, d_model=512, layers=8, heads=8, d_ff=2048, seq=256, batch=8),
    # GPT-2 small's shape at issue 17's training step: bench --preset gpt2 --batch 8 --seq 512.
    "gpt2": dict(vocab=50257, d_model=768, layers=12, heads=12, d_ff=3072, seq=512, batch=8),
}
