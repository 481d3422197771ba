"""Benchmark privdiff's blocked nearest-neighbour search against this machine's matrix products.

Prints, for each shape, the GFLOP/s of ``nearest_neighbors`` (counting the 2*N*M*D flops of the
distance products) and of the fp32 ``N x D @ D x M`` product computed in blocks of 4096 query rows
into a reused output (the machine's best rate for it) measured in the same run, and their ratio
(medians of repeats); then the same against faiss's exact ``IndexFlatL2``. Then the peak extra memory (RSS of a child process) of one
search over a large N x M, next to what the dense N x M distance matrix would take.

    python scripts/bench_knn.py            # ~1-2 minutes on 2 cores
    python scripts/bench_knn.py --quick    # seconds
    python scripts/bench_knn.py --large    # N=100k, M=50k, D=3072 (long)
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from privdiff.distances import nearest_neighbors


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def blocked_matmul(q: torch.Tensor, r: torch.Tensor, rows: int = 4096) -> None:
    """The same N x D @ D x M product in blocks of query rows into one reused output: the machine's
    best fp32 matmul rate for these shapes (a single ``q @ r.T`` also pays for a fresh N x M output)."""
    out = torch.empty(min(rows, q.shape[0]), r.shape[0], dtype=q.dtype, device=q.device)
    rt = r.T
    for i in range(0, q.shape[0], rows):
        block = q[i : i + rows]
        torch.mm(block, rt, out=out[: block.shape[0]])


def throughput(n: int, m: int, d: int, k: int, repeats: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.rand(n, d, generator=g).to(device)
    r = torch.rand(m, d, generator=g).to(device)
    gflop = 2.0 * n * m * d / 1e9
    t_mm = _median_time(lambda: blocked_matmul(q, r), repeats, device)
    t_nn = _median_time(lambda: nearest_neighbors(q, r, k=k), repeats, device)
    return {"mm_gflops": gflop / t_mm, "nn_gflops": gflop / t_nn, "ratio": t_mm / t_nn, "t_nn": t_nn}


def child_peak_memory(n: int, m: int, d: int, threads: int) -> None:
    """Run in a subprocess: print the peak RSS growth (bytes) caused by one search, and the process's peak."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q = torch.rand(n, d, generator=g)
    r = torch.rand(m, d, generator=g)
    nearest_neighbors(q[:8], r[:8], k=1)  # load the BLAS kernels before taking the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    t = time.perf_counter()
    nearest_neighbors(q, r, k=1)
    elapsed = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra_bytes": peak - base, "peak_bytes": peak, "seconds": elapsed}))


def faiss_line(n: int, m: int, d: int, repeats: int, threads: int) -> str:
    """privdiff's k=1 search against faiss ``IndexFlatL2`` (exact, brute force) on the same data and threads."""
    try:
        import faiss  # noqa: PLC0415 (optional: `pip install faiss-cpu`, the bench extra)
    except ImportError:
        return f"faiss not installed (pip install faiss-cpu): no comparison at N={n} M={m} D={d}"
    faiss.omp_set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q = torch.rand(n, d, generator=g).numpy()
    r = torch.rand(m, d, generator=g).numpy()
    index = faiss.IndexFlatL2(d)
    index.add(r)
    t_faiss = _median_time(lambda: index.search(q, 1), repeats, "cpu")
    t_nn = _median_time(lambda: nearest_neighbors(torch.from_numpy(q), torch.from_numpy(r), k=1), repeats, "cpu")
    t_mm = _median_time(lambda: blocked_matmul(torch.from_numpy(q), torch.from_numpy(r)), repeats, "cpu")
    _, found = index.search(q, 1)
    ours = nearest_neighbors(torch.from_numpy(q), torch.from_numpy(r), k=1).indices[:, 0].numpy()
    agree = float((found[:, 0] == ours).mean())
    return (
        f"{n:>7} {m:>6} {d:>5}   faiss {2 * n * m * d / 1e9 / t_faiss:6.1f} GFLOP/s ({t_mm / t_faiss:.2f} of matmul), "
        f"privdiff {2 * n * m * d / 1e9 / t_nn:6.1f} GFLOP/s: {t_faiss / t_nn:.2f}x faiss; same nearest index for {agree:.2%}"
    )


def main(quick: bool = False, large: bool = False, threads: int = 1, repeats: int = 3, device: str = "cpu",
         child_memory: tuple[int, int, int, int] | None = None) -> None:
    """Print the search's rate against matmul and faiss, then its peak memory (measured in a child process).

    Args:
        quick: small shapes, for a smoke run
        large: memory run at N=100k, M=50k, D=3072
        threads: torch CPU threads
        repeats: timed repeats of each shape (the median is printed)
        device: torch device of the throughput runs
        child_memory: N M D THREADS: only measure one search's peak memory, in this process (what the child runs)
    """
    if child_memory:
        child_peak_memory(*child_memory)
        return
    torch.set_num_threads(threads)
    n, m = (2000, 500) if quick else (10_000, 2000)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, median of {repeats}")
    print(f"{'N':>7} {'M':>6} {'D':>5} {'k':>3} {'matmul GFLOP/s':>15} {'knn GFLOP/s':>12} {'knn/matmul':>11}")
    for d in (256, 1024):
        for k in (1, 50):
            res = throughput(n, m, d, k, repeats, device)
            print(f"{n:>7} {m:>6} {d:>5} {k:>3} {res['mm_gflops']:>15.1f} {res['nn_gflops']:>12.1f} {res['ratio']:>11.2f}")
    print("k=1 against faiss IndexFlatL2 (exact search, same threads):")
    for d in (256, 1024):
        print(faiss_line(n, m, d, repeats, threads))

    mn, mm, md = (4000, 2000, 3072) if quick else (100_000, 50_000, 3072) if large else (20_000, 10_000, 3072)
    out = subprocess.run(
        [sys.executable, __file__, "--child-memory", str(mn), str(mm), str(md), str(threads)],
        capture_output=True, text=True, check=True,
    )
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    dense = mn * mm * 4
    print(
        f"peak memory N={mn} M={mm} D={md} k=1 ({threads} thread(s), child RSS): +{mem['extra_bytes'] / 2**20:.0f} MiB "
        f"over the float32 inputs ({mn * md * 4 / 2**20 + mm * md * 4 / 2**20:.0f} MiB), process peak "
        f"{mem['peak_bytes'] / 2**20:.0f} MiB; a dense N x M float32 matrix would be {dense / 2**20:.0f} MiB; "
        f"search took {mem['seconds']:.1f} s"
    )


if __name__ == "__main__":
    from _cli import run_main  # scripts/_cli.py, beside this file

    run_main(main, __doc__)
