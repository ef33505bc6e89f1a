"""Kernel benchmark: f32 dot vs XLA int8 dot vs bnnjax's packed XNOR-popcount matmul, on the same ±1 data.

Prints one JSON object per case: case, m, n, k, f32_ms, int8_ms, packed_ms (best of --repeats runs
after a warm-up, all in one process), the speed-ups, and whether the packed result equals the f32 one.

    python experiments/bench_kernels.py [--repeats 7]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bnnjax import packing

# seed-000's binary convolutions as im2col matmuls at batch 64: M = 64 * Ho * Wo, K = 3 * 3 * Cin
CASES = [("square_2048", 2048, 2048, 2048), ("wide_64x4096x4096", 64, 4096, 4096),
         ("seed000_conv2_im2col_b64", 64 * 11 * 11, 64, 288), ("seed000_conv3_im2col_b64", 64 * 3 * 3, 64, 576),
         ("seed000_dense1_b64", 64, 64, 576), ("odd_k_1000", 333, 517, 1000)]


def best_ms(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, help="also append each line, with its provenance, to this results file")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    f32 = jax.jit(lambda x, y: jnp.dot(x, y.T))
    i8 = jax.jit(lambda x, y: jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32))
    for case, m, n, k in CASES:
        x = np.where(rng.random((m, k)) < 0.5, 1.0, -1.0).astype(np.float32)
        y = np.where(rng.random((n, k)) < 0.5, 1.0, -1.0).astype(np.float32)
        xp, yp = packing.pack_bits(x), packing.pack_bits(y)
        packed = jax.jit(lambda u, v, k=k: packing.xnor_matmul(u, v, k))
        xf, yf, x8, y8 = jnp.asarray(x), jnp.asarray(y), jnp.asarray(x, jnp.int8), jnp.asarray(y, jnp.int8)
        row = {"case": case, "m": m, "n": n, "k": k,
               "f32_ms": round(best_ms(f32, xf, yf, repeats=a.repeats), 4),
               "int8_ms": round(best_ms(i8, x8, y8, repeats=a.repeats), 4),
               "packed_ms": round(best_ms(packed, xp, yp, repeats=a.repeats), 4)}
        row["packed_vs_f32"] = round(row["f32_ms"] / row["packed_ms"], 2)
        row["packed_vs_int8"] = round(row["int8_ms"] / row["packed_ms"], 2)
        row["exact"] = bool(np.array_equal(np.asarray(packed(xp, yp)), np.asarray(f32(xf, yf)).astype(np.int32)))
        row["kernel"] = packing.backend_kernel()
        if a.out:
            from _results import append  # experiments/ is on sys.path when this script runs

            row = append(a.out, row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
