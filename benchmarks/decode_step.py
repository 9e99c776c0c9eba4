"""One decoding step of the embedded agent's shape, timed against the number of cached positions.

    python benchmarks/decode_step.py [--batch 240] [--threads 1] [--dtype fp32|bf16-autocast|bf16]

A randomly initialised Llama of the default agent's shape (`BootstrapConfig()`: hidden 192, 4 layers,
3 heads, MLP 512, vocabulary 1024) decodes one token for each of `--batch` rows over a cache of L positions, through the
hf backend's own in-place cache layer. The step's time against L separates what a step costs anyway
(the weights, the Python) from what reading the cached keys and values costs; the GB/s column is the
fp32-equivalent size of those keys and values over the step's time. `bf16-autocast` is what
`--dtype bfloat16` does on a CPU (fp32 weights, autocast); `bf16` holds weights and cache in bf16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from leafe.backends.hf.cache import buffer_layer_class
from leafe.settings import BootstrapConfig


def step_ms(model, config, batch: int, length: int, dtype: torch.dtype, autocast: bool, steps: int = 12) -> float:
    layer = buffer_layer_class()
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    cache.layers = [layer(torch.randn(batch, heads, length + steps, dim, dtype=dtype),
                          torch.randn(batch, heads, length + steps, dim, dtype=dtype), length)
                    for _ in range(config.num_hidden_layers)]
    mask = torch.ones(batch, length, dtype=torch.long)
    positions = torch.full((batch,), length)
    ids = torch.zeros(batch, dtype=torch.long)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            started = time.perf_counter()
            model(input_ids=ids[:, None], attention_mask=mask, position_ids=positions[:, None], use_cache=True,
                  cache=cache)
            times.append(time.perf_counter() - started)
            positions = positions + 1
    return 1000 * statistics.median(times[2:])  # the first steps warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=240)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16-autocast", "bf16"), default="fp32")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 300, 1000, 2000])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    agent = BootstrapConfig()
    config = LlamaConfig(vocab_size=agent.vocab_size, hidden_size=agent.hidden_size, num_hidden_layers=agent.layers,
                         num_attention_heads=agent.heads, num_key_value_heads=agent.kv_heads or agent.heads,
                         intermediate_size=agent.intermediate_size, max_position_embeddings=agent.context)
    model = LlamaForCausalLM(config).eval()
    cache_dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    for length in args.lengths:
        ms = step_ms(model, config, args.batch, length, cache_dtype, autocast=args.dtype == "bf16-autocast")
        gb = args.batch * length * config.num_hidden_layers * 2 * config.hidden_size * 4 / 1e9
        print(f"{args.dtype} batch {args.batch}, {length:5d} cached positions: {ms:7.1f} ms a step, "
              f"{gb:.2f} GB of fp32 keys/values -> {gb / ms * 1000:5.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
