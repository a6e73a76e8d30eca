"""Which codec for the stored gradient rows: size and decode speed of each candidate on real rows.

Reads a real gradient store (fp16 projected gradients written by `project-grads`), encodes each of its
chunks with every candidate codec (numcodecs, the codecs zarr uses) and prints the compression ratio,
the decode throughput on one thread, and the time one second of raw reading would become. Projected
gradients are sums of many random signs times gradient entries: close to Gaussian noise, so lossless
codecs gain little on them, and decoding costs more than the bytes saved.

    python scripts/bench_codecs.py --store runs/less-vs-random/run/grads.zarr --group dim2048/train/epoch-1
"""

from __future__ import annotations

import argparse
import time

import numcodecs
import numpy as np
import zarr

CANDIDATES = {
    "none": None,
    "zstd level 0 (zarr 3's default)": numcodecs.Zstd(level=0),
    "zstd level 3": numcodecs.Zstd(level=3),
    "blosc lz4, byte shuffle": numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
    "blosc lz4, bit shuffle": numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE),
    "blosc zstd, bit shuffle": numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE),
}


def decode_seconds(codec, encoded: list[bytes], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        for blob in encoded:
            codec.decode(blob)
    return (time.perf_counter() - started) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a grads.zarr folder")
    parser.add_argument("--group", required=True, help="a store inside it, e.g. dim2048/train/epoch-1")
    parser.add_argument("--read-gbps", type=float, default=2.0, help="raw read speed to compare with (GB/s)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    numcodecs.blosc.set_nthreads(1)
    array = zarr.open_group(args.store, mode="r")[args.group]["grads"]
    rows = array[:]
    chunk = array.chunks[0]
    chunks = [np.ascontiguousarray(rows[start : start + chunk]) for start in range(0, len(rows), chunk)]
    raw = sum(c.nbytes for c in chunks)
    print(f"{args.store}/{args.group}: {rows.shape[0]} x {rows.shape[1]} {rows.dtype}, {len(chunks)} chunks, "
          f"{raw / 2**20:.1f} MiB raw")
    print(f"{'codec':<34}{'ratio':>8}{'decode GB/s':>14}{'1 s of raw reading becomes (s)':>34}")
    for name, codec in CANDIDATES.items():
        if codec is None:
            print(f"{name:<34}{1.0:>8.3f}{'-':>14}{1.0:>34.2f}")
            continue
        encoded = [codec.encode(c) for c in chunks]
        size = sum(len(e) for e in encoded)
        seconds = decode_seconds(codec, encoded, args.repeat)
        gbps = raw / seconds / 1e9
        read_time = (size / raw) + args.read_gbps / gbps  # reading fewer bytes, then decoding them
        print(f"{name:<34}{raw / size:>8.3f}{gbps:>14.2f}{read_time:>34.2f}")


if __name__ == "__main__":
    main()
