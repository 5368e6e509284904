"""FLOP/s of a training step's matmuls, one by one, in XLA and in PyTorch.

  python bench/matmul_shapes.py                       # BERT-Small, batch 16 x 128, 20 masked/row
  python bench/matmul_shapes.py --tokens 1024 --masked 1024 --vocab 50257   # GPT LM head

For each weight of a layer (projection D->D, MLP D->I and I->D, the tied vocabulary
projection over the masked rows) it times the three products of a training step:
forward (x W), input gradient (g W^T) and weight gradient (x^T g), as jitted XLA
einsums and as PyTorch matmuls (transposed views, as autograd calls them), best of
`--repeats`. This shows how close to the square-matmul peak each shape gets, which
bounds the MFU of the whole step (bench/RESULTS.md).

Prints one line per product:
  mlm-decoder weight-grad (320x512x30522 = rows x hidden x vocab): xla=N torch=N GFLOP/s
"""

import argparse
import time


def best_time(fn, repeats: int) -> float:
  fn()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def products(args):
  """(name, M, K, N, vocab-major weight?) for every weight; the rows are tokens or masked rows."""
  d, i, v = args.hidden, args.intermediate, args.vocab
  return [("projection", args.tokens, d, d, False), ("mlp-up", args.tokens, d, i, False),
          ("mlp-down", args.tokens, i, d, False), ("mlm-decoder", args.masked, d, v, True)]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--intermediate", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=30522)
  p.add_argument("--tokens", type=int, default=2048, help="rows of the layer matmuls (B*L)")
  p.add_argument("--masked", type=int, default=320, help="rows of the vocabulary projection")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  def xla(fn, *arrays):
    f = jax.jit(fn)
    return lambda: f(*arrays).block_until_ready()

  print(f"device: {jax.devices()[0].platform}, jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  for name, m, k, n, vocab_major in products(args):
    x, g = jnp.ones((m, k)) / k, jnp.ones((m, n)) / n
    w = jnp.ones((n, k) if vocab_major else (k, n)) / k
    xt, gt, wt = (torch.ones(a.shape) / a.shape[-1] for a in (x, g, w))
    if vocab_major:  # the tied decoder: logits = x W^T with W [V, D]
      cases = [("forward", xla(lambda a, b: a @ b.T, x, w), lambda: xt @ wt.T),
               ("input-grad", xla(lambda a, b: a @ b, g, w), lambda: gt @ wt),
               ("weight-grad", xla(lambda a, b: a.T @ b, g, x), lambda: gt.T @ xt)]
    else:
      cases = [("forward", xla(lambda a, b: a @ b, x, w), lambda: xt @ wt),
               ("input-grad", xla(lambda a, b: a @ b.T, g, w), lambda: gt @ wt.T),
               ("weight-grad", xla(lambda a, b: a.T @ b, x, g), lambda: xt.T @ gt)]
    flops = 2 * m * k * n
    for case, run_xla, run_torch in cases:
      print(f"{name} {case} ({m}x{k}x{n}): xla={flops / best_time(run_xla, args.repeats) / 1e9:.0f} "
            f"torch={flops / best_time(run_torch, args.repeats) / 1e9:.0f} GFLOP/s", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
