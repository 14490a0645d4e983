"""IDX files: finding a dataset's four (data.root, $DLBASE_DATA, ./data, the user cache, the system folder, or
torchvision's download), checking them (the IDX header, the originals' md5, the labels) and reading them (a large
gzipped file decompressed and hashed once, into the user cache). dlbase/core/data.py puts them on the device."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dlbase.core.errors import DataError, DlbaseError

NUM_CLASSES = 10

# (images, labels) base names per split; the originals' gz members use '.' before idx ("train-images.idx3-ubyte").
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# md5 of the *uncompressed* original files, so a recompressed copy (Debian's, say) still verifies.
KNOWN_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
# Sample counts of the originals: a file with the original's name *and* count claims to be it, so it is verified.
ORIGINAL_COUNTS = {"train": 60000, "test": 10000}

# Where each dataset sits inside a data root, in the order we look (torchvision's layout included).
SUBDIRS = {
    "mnist": ("", "mnist", "MNIST/raw", "MNIST"),
    "fashion_mnist": ("", "fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST"),
}
SYSTEM_DIRS = {"mnist": "/usr/share/datasets/mnist", "fashion_mnist": "/usr/share/datasets/fashion-mnist"}
TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}

_IDX_DTYPE_UBYTE = 0x08
_MAX_DIM = 1 << 28


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlbase"


# ----------------------------------------------------------------------------- IDX


def _open(path: Path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | os.PathLike, ndim: int) -> tuple[torch.Tensor, str]:
    """Read an unsigned-byte IDX file (gzipped or not) -> (uint8 tensor of its shape, md5 of the raw bytes).

    Checks the magic number, the number of dimensions and that the data is exactly as long as the header says.
    A large gzipped file is decompressed and hashed once: its bytes and md5 are kept in the user cache, keyed by
    the file's path, size and modification time, and read from there the next time (1.3 s less per run on a
    2-core CPU for MNIST's training images).
    """
    path = Path(path)
    cached = _cache_entry(path)
    if cached is not None and cached.is_file():
        try:
            blob = cached.read_bytes()
            data, _ = _parse(io.BytesIO(blob[32:]), path, ndim, hash_it=False)
            return data, blob[:32].decode("ascii")
        except (DataError, OSError, UnicodeDecodeError):
            pass  # a damaged cache entry: read the file itself
    data, md5 = _parse(_open(path), path, ndim)
    if cached is not None:
        _write_cache(cached, data, md5, ndim)
    return data, md5


_CACHE_MIN_BYTES = 1 << 20  # smaller files decompress faster than the cache is looked up


def _cache_entry(path: Path) -> Optional[Path]:
    """Where a gzipped IDX file's decompressed bytes are cached, or None when it is not worth it."""
    try:
        st = path.stat()
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b" or st.st_size < _CACHE_MIN_BYTES // 8:
                return None
    except OSError:
        return None
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return user_cache_dir() / "idx" / (hashlib.sha256(key).hexdigest()[:32] + ".idx")


def _write_cache(entry: Path, data: torch.Tensor, md5: str, ndim: int) -> None:
    """md5 (32 ascii bytes), then the IDX file as it is uncompressed; a cache that cannot be written is skipped."""
    if data.numel() < _CACHE_MIN_BYTES:
        return
    from dlbase.core.rundir import write_atomic
    header = bytes([0, 0, _IDX_DTYPE_UBYTE, ndim]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(entry, md5.encode("ascii") + header + data.numpy().tobytes(), "cache")
    except (OSError, DlbaseError):
        pass


def _parse(opened, path: Path, ndim: int, hash_it: bool = True) -> tuple[torch.Tensor, str]:
    """The IDX checks and the data of an opened file (closed here); md5 of the raw bytes when hash_it."""
    try:
        with opened as fh:
            head = fh.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: not an IDX file: {len(head)} bytes, shorter than the 4-byte magic number")
            if head[0] != 0 or head[1] != 0 or head[2] != _IDX_DTYPE_UBYTE or head[3] != ndim:
                want = 0x0800 + ndim
                raise DataError(f"{path}: wrong magic number {int.from_bytes(head, 'big')} "
                                f"(0x{head.hex()}); expected {want} (0x{want:08x}, unsigned bytes, {ndim}-d)")
            dims_raw = fh.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
            dims = [int.from_bytes(dims_raw[4 * i:4 * i + 4], "big") for i in range(ndim)]
            if any(d > _MAX_DIM for d in dims) or (ndim == 3 and (dims[1] > 4096 or dims[2] > 4096)):
                raise DataError(f"{path}: implausible IDX dimensions {dims}")
            size = 1
            for d in dims:
                size *= d
            if size > 1 << 32 or (isinstance(fh, io.BufferedReader) and size > path.stat().st_size):
                raise DataError(f"{path}: the header promises {dims} = {size} bytes of data, more than the file "
                                f"{'could hold' if size > 1 << 32 else 'holds'}: truncated or not an IDX file")
            body = fh.read(size)  # bounded by the header, so a decompression bomb cannot exhaust memory
            if len(body) < size:
                raise DataError(f"{path}: truncated: the header promises {dims} = {size} bytes of data, "
                                f"found {len(body)}")
            if fh.read(1):
                raise DataError(f"{path}: {size} bytes of data expected after the header, found more")
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"{path}: file not found") from None
        raise DataError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    md5 = hashlib.md5(head + dims_raw + body, usedforsecurity=False).hexdigest() if hash_it else ""
    data = torch.frombuffer(bytearray(body), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    return data.reshape(dims), md5


# ----------------------------------------------------------------------------- finding files


def _find_file(folder: Path, base: str) -> Optional[Path]:
    dotted = base.replace("-idx", ".idx")
    for name in (base, base + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_split(folder: Path, split: str) -> Optional[tuple[Path, Path]]:
    """(images, labels) paths of a split inside folder, or None when either is missing."""
    images, labels = (_find_file(folder, b) for b in SPLIT_FILES[split])
    return (images, labels) if images and labels else None


def candidate_roots(root: Optional[str], dataset: str) -> list[Path]:
    if root is not None:
        return [Path(root).expanduser()]
    roots = []
    if os.environ.get("DLBASE_DATA"):
        roots.append(Path(os.environ["DLBASE_DATA"]).expanduser())
    roots += [Path("data"), user_cache_dir(), Path(SYSTEM_DIRS[dataset])]
    return roots


def _identify(md5: str, base: str) -> Optional[str]:
    for name, sums in KNOWN_MD5.items():
        if sums.get(base) == md5:
            return name
    return None


@dataclass
class Split:
    """One split, as loaded from disk: images (N, H, W) uint8 and labels (N,) int64, on the CPU."""
    images: torch.Tensor
    labels: torch.Tensor
    source: Path


class _WrongDataset(DataError):
    """The files are the originals of another dataset than the one asked for."""


def load_split(folder: Path, split: str, dataset: str, verify: bool = True) -> Split:
    paths = find_split(folder, split)
    if paths is None:
        raise DataError(f"{folder}: no {split} files ({' and '.join(SPLIT_FILES[split])}, optionally .gz)")
    img_path, lbl_path = paths
    images, img_md5 = read_idx(img_path, 3)
    labels, lbl_md5 = read_idx(lbl_path, 1)
    for path, md5, base, n in ((img_path, img_md5, SPLIT_FILES[split][0], images.shape[0]),
                               (lbl_path, lbl_md5, SPLIT_FILES[split][1], labels.shape[0])):
        # A file named as an original and as long as one claims to be it: hold it to the published md5.
        if verify and n == ORIGINAL_COUNTS[split] and md5 != KNOWN_MD5[dataset][base]:
            other = _identify(md5, base)
            if other is not None:
                raise _WrongDataset(f"{path}: this is {other}'s file, but data.dataset is {dataset}")
            raise DataError(f"{path}: md5 {md5} of its contents does not match the original {dataset} file "
                            f"({KNOWN_MD5[dataset][base]}): corrupted or altered; replace it, or set "
                            f"data.verify: false to use it as it is")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{lbl_path}: {labels.shape[0]} labels for {images.shape[0]} images in {img_path.name}")
    if images.shape[0] == 0:
        raise DataError(f"{img_path}: holds no images")
    if labels.numel() and int(labels.max()) >= NUM_CLASSES:
        bad = int(labels.max())
        raise DataError(f"{lbl_path}: label {bad} at index {int((labels == bad).nonzero()[0])}; "
                        f"labels must be 0-{NUM_CLASSES - 1}")
    return Split(images, labels.long(), folder)


def _download(root: Path, dataset: str) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError:  # pragma: no cover - torchvision is a dependency
        raise DataError("data.download needs torchvision, which is not installed") from None
    try:
        getattr(tvd, TORCHVISION_CLASS[dataset])(root=str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300] or type(e).__name__
        raise DataError(f"data.download: could not download {dataset} into {root} ({reason}); put the four "
                        f"IDX files there or point data.root at them") from None


def locate(root: Optional[str], dataset: str, download: bool) -> Path:
    """The folder holding the dataset's four IDX files; downloads into root (or the cache) when allowed."""
    looked = []
    for r in candidate_roots(root, dataset):
        for sub in SUBDIRS[dataset]:
            folder = r / sub if sub else r
            looked.append(str(folder))
            if find_split(folder, "train") and find_split(folder, "test"):
                if root is None and _belongs_elsewhere(folder, dataset):
                    continue
                return folder
    if download:
        target = Path(root).expanduser() if root is not None else user_cache_dir()
        _download(target, dataset)
        folder = target / TORCHVISION_CLASS[dataset] / "raw"
        if find_split(folder, "train") and find_split(folder, "test"):
            return folder
        raise DataError(f"data.download: torchvision finished but no IDX files are in {folder}")
    raise DataError(f"{dataset} not found: looked in {', '.join(dict.fromkeys(looked))}; set data.root to the "
                    f"folder with the four IDX files, or data.download: true")


def _belongs_elsewhere(folder: Path, dataset: str) -> bool:
    """True when the labels file there is another dataset's original (searching, we skip such folders)."""
    _, labels = find_split(folder, "test")
    try:
        _, md5 = read_idx(labels, 1)
    except DataError:
        return False
    other = _identify(md5, SPLIT_FILES["test"][1])
    return other is not None and other != dataset


def training_size(cfg) -> Optional[int]:
    """How many training samples a DataConfig uses (the train labels file's count, or data.subset when smaller),
    read from the file's 8-byte header only; None when the files cannot be found or read (loading says why)."""
    try:
        folder = locate(cfg.root, cfg.dataset, download=False)
        _, labels = find_split(folder, "train")
        with _open(labels) as fh:
            head = fh.read(8)
    except (DataError, OSError, EOFError, zlib.error, gzip.BadGzipFile):
        return None
    if len(head) < 8:
        return None
    count = int.from_bytes(head[4:8], "big")
    return min(count, cfg.subset) if cfg.subset is not None else count


def read_checked(cfg) -> tuple[Path, Split, Split]:
    """The dataset's folder and its train and test splits, read and checked (same image size)."""
    folder = locate(cfg.root, cfg.dataset, cfg.download)
    try:
        train = load_split(folder, "train", cfg.dataset, cfg.verify)
        test = load_split(folder, "test", cfg.dataset, cfg.verify)
    except _WrongDataset as e:
        raise DataError(str(e)) from None
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"{folder}: train images are {tuple(train.images.shape[1:])}, test images "
                        f"{tuple(test.images.shape[1:])}; they must be the same size")
    return folder, train, test
