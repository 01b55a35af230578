"""Every supported Hadamard order up to --limit: ``H H^T = n I`` exactly in float64, and the fast
transform equal to the explicit matrix.

    python3 benchmarks/hadamard_orders.py --limit 8192 --device cuda   # all 479 orders, full products
    python3 benchmarks/hadamard_orders.py --limit 8192 --vectors 32    # CPU: Freivalds' check

For each n = m * p (``paley.split_order``: m from Paley I/II or a Kronecker product, p a power of
two) the unnormalised ``H = kron(H_m, H_p)`` is built and ``H @ H.T`` compared with ``n I`` by exact
equality (integer entries: every product and partial sum is an integer below 2^53, so float64 is
exact). With ``--vectors k`` the product is not formed: ``H (H^T V) == n V`` is checked exactly for
k random ±1 vectors V (Freivalds: if ``H H^T != n I`` a random sign vector exposes it with
probability at least 1/2, so k = 32 misses with probability below 2^-32 per order), which costs
O(k n^2) instead of O(n^3). Then the fast transform (power-of-two factor by the Walsh-Hadamard
routes, m-factor as a dense matmul) is compared with ``diag(signs) H / sqrt(n)``: on the identity
(full check), or with ``--vectors`` on the same vectors.
Prints a summary: how many orders, how many failed each check, the largest transform error, and
the widths without a full matrix (multiples of 4 only; odd widths have none).
"""
from __future__ import annotations

import argparse
import time

import torch

from lowbit.transforms.hadamard import random_signs, rotate
from lowbit.transforms.paley import MAX_DENSE, construction, hadamard_of_order, split_order, supported_orders, sylvester


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=8192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vectors", type=int, default=0, help="Freivalds' check with this many random sign vectors "
                    "instead of the full product (0: full product)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    t0 = time.time()
    orders = supported_orders(args.limit)
    bad_hh, worst, worst_n = [], 0.0, None
    for n in orders:
        m, p = split_order(n)
        H = torch.kron(hadamard_of_order(m).to(dev), sylvester(p).to(dev))
        s = random_signs(n, n).to(dev).double()
        if args.vectors:
            V = random_signs(n * args.vectors, n + 1).to(dev).double().reshape(n, args.vectors)
            if not torch.equal(H @ (H.T @ V), n * V):
                bad_hh.append(n)
            # rows of V.T through the fast transform vs the explicit matrix
            err = float((rotate(V.T.contiguous(), n, s) - (V.T * s) @ H / n ** 0.5).abs().max())
        else:
            if not torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64, device=dev)):
                bad_hh.append(n)
            R = rotate(torch.eye(n, dtype=torch.float64, device=dev), n, s)
            err = float((R - s[:, None] * H / n ** 0.5).abs().max())
        if err > worst:
            worst, worst_n = err, n
        del H
    dense = sorted({split_order(n)[0] for n in orders} - {1})
    missing = [n for n in range(4, args.limit + 1, 4) if n not in set(orders)]
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; {len(orders)} supported "
          f"orders <= {args.limit} (dense factor m <= {MAX_DENSE}); {time.time() - t0:.1f} s")
    how = f"Freivalds, {args.vectors} random sign vectors" if args.vectors else "full product"
    print(f"H H^T == n I exactly (float64, {how}): {len(orders) - len(bad_hh)} of {len(orders)}; failures: {bad_hh}")
    print(f"fast transform vs explicit matrix: max abs diff {worst:.2e} (at n = {worst_n})")
    print(f"dense factors used: {len(dense)}, e.g. {dense[:20]}; constructions: "
          + ", ".join(f"{m}: {construction(m)}" for m in dense[:8]))
    print(f"multiples of 4 without a full matrix: {len(missing)}, first {missing[:12]}")


if __name__ == "__main__":
    main()
