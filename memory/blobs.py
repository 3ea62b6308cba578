"""The ledger's tensor files: content-addressed safetensors beside its database, and the errors it raises.

    <root>/deltas/<hash>.safetensors   low-rank factors of one batch (EditDelta; hash = EditDelta.content_hash)
    <root>/keys/<hash>.safetensors     the batch's keys K per layer (hash = hash_tensors)
    <root>/base/<hash>.safetensors     base weights of an edited layer, stored once (hash = hash_tensors)

A file is written to a temp name, fsynced and renamed into place, so it is either whole or absent;
writing one that is already there is a no-op. Files no database row refers to (a crash between the
write and the commit) are orphans, listed and removed here. Layer fingerprints (a norm and seeded
projections of a weight) let the ledger check rebuilt weights without storing them again; they carry their
format version, so a ledger written with format 1 still verifies, and tolerances follow the weight's dtype.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Collection, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from editors.delta import EditDelta

log = logging.getLogger(__name__)

FINGERPRINT_RTOL = 2e-5  # tolerated relative difference of fp32 layers and fingerprints (device round-off)
# per weight dtype: about one unit of the format's last place (bf16 2^-7, fp16 2^-10), so a CUDA-computed weight
# whose fp32 delta rounded differently from the CPU rebuild in a few elements still matches
WEIGHT_RTOL = {torch.float64: FINGERPRINT_RTOL, torch.float32: FINGERPRINT_RTOL, torch.float16: 1e-3,
               torch.bfloat16: 8e-3}
FINGERPRINT_VERSION = 2  # 1: 4 projections of the flattened weight (older ledgers); 2: 4 bilinear forms
Fingerprint = list[float] | dict  # format 1: [norm, p1..p4]; format 2: {"v": 2, "fp": [norm, p1..p4]}
KINDS = ("deltas", "keys", "base")


class LedgerError(RuntimeError):
    """A request the ledger cannot honour (unknown batch, wrong status, missing recompute...)."""


class LedgerMismatch(LedgerError):
    """The model or the files disagree with what the ledger recorded."""


def hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """Content hash of named tensors (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def keys_tensors(keys: Mapping[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"layer.{layer}": k.detach().cpu().contiguous() for layer, k in keys.items()}


def keys_from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    return {int(name.split(".")[1]): t for name, t in tensors.items()}


def weight_rtol(dtype: torch.dtype) -> float:
    """Tolerated relative difference of a weight (and its fingerprint) rebuilt elsewhere, for the weight's dtype."""
    return WEIGHT_RTOL.get(dtype, FINGERPRINT_RTOL)


def layer_fingerprint(w: torch.Tensor, layer: int, version: int = FINGERPRINT_VERSION) -> Fingerprint:
    """The weight's fingerprint in format `version`: 2 (written now) is {"v": 2, "fp": [...]}, 1 a bare list."""
    if version == 1:
        return _fingerprint_v1(w, layer)
    return {"v": 2, "fp": _fingerprint_v2(w, layer)}


def _fingerprint_v1(w: torch.Tensor, layer: int) -> list[float]:
    """Frobenius norm and 4 seeded Gaussian projections of the flattened weight (a (4, numel) fp64 draw: ~1.9 GB
    per layer of an 8B model). Still computed to check fingerprints older ledgers stored."""
    w64 = w.detach().double().cpu().flatten()
    gen = torch.Generator().manual_seed(7919 + layer)
    proj = torch.randn(4, w64.numel(), generator=gen, dtype=torch.float64) @ w64
    return [float(w64.norm())] + proj.tolist()


def _fingerprint_v2(w: torch.Tensor, layer: int) -> list[float]:
    """Frobenius norm and 4 seeded bilinear forms a_i^T W b_i (a_i, b_i Gaussian over the rows and columns): 4 (out + in)
    random numbers and one (out, in) x (in, 4) product on the weight's device, instead of 4 x numel."""
    gen = torch.Generator().manual_seed(7919 + layer)
    a = torch.randn(4, w.shape[0], generator=gen, dtype=torch.float64)
    b = torch.randn(4, w.shape[1], generator=gen, dtype=torch.float64)
    wb = (w.detach().float() @ b.T.to(w.device, torch.float32)).double().cpu()  # (out, 4)
    norm = torch.linalg.vector_norm(w.detach(), dtype=torch.float64)
    return [float(norm)] + (a * wb.T).sum(1).tolist()


def fingerprint_values(fp: Fingerprint) -> tuple[int, list[float]]:
    """(format version, values) of a stored fingerprint."""
    return (int(fp["v"]), list(fp["fp"])) if isinstance(fp, dict) else (1, list(fp))


def weight_matches(w: torch.Tensor, layer: int, stored: Fingerprint) -> bool:
    """Whether `w` has the fingerprint `stored`, in the format it was stored in, within the tolerance of w's dtype."""
    version, values = fingerprint_values(stored)
    _, fresh = fingerprint_values(layer_fingerprint(w, layer, version))
    return fingerprints_match(fresh, values, weight_rtol(w.dtype))


def fingerprints_match(a: Sequence[float], b: Sequence[float], rtol: float = FINGERPRINT_RTOL) -> bool:
    scale = max(abs(a[0]), abs(b[0]), 1e-12)
    return len(a) == len(b) and all(abs(x - y) <= rtol * scale for x, y in zip(a, b))


class BlobStore:
    """The tensor files under `root`, one folder per kind (KINDS), each file named by its content hash."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, kind: str, digest: str) -> Path:
        return self.root / kind / f"{digest}.safetensors"

    def write(self, kind: str, digest: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Write tensors to <root>/<kind>/<digest>.safetensors via temp + fsync + rename (idempotent).

        A failed write (disk full, I/O error) removes its temp file and raises LedgerError; callers write files
        before their DB transaction, so nothing is committed."""
        folder = self.root / kind
        folder.mkdir(exist_ok=True)
        path = folder / f"{digest}.safetensors"
        if path.exists() and self.content_hash(kind, path) == digest:
            return path
        tmp = folder / f".{digest}.{os.getpid()}.tmp"
        try:
            save_file(dict(tensors), str(tmp))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except (OSError, SafetensorError) as exc:  # safetensors reports a failed write as SafetensorError
            tmp.unlink(missing_ok=True)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
            raise LedgerError(f"cannot write {kind} file {path} ({why})") from exc
        return path

    @staticmethod
    def content_hash(kind: str, path: Path) -> str:
        if kind == "deltas":
            return EditDelta.load(path).content_hash()
        return hash_tensors(load_file(str(path)))

    def load(self, kind: str, digest: str) -> dict[str, torch.Tensor]:
        path = self.path(kind, digest)
        if not path.exists():
            raise LedgerMismatch(f"{kind} file {path} is missing")
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for damaged files
            raise LedgerMismatch(f"{kind} file {path} is unreadable ({type(exc).__name__}); run `kagent verify`") from None

    def check(self, kind: str, digest: str, what: str) -> list[str]:
        """Problems with one file (missing, unreadable, content not matching `digest`), each naming `what`."""
        path = self.path(kind, digest)
        if not path.exists():
            return [f"{what}: {kind} file {path.name} is missing"]
        try:
            actual = self.content_hash(kind, path)
        except Exception as exc:  # unreadable file: report, do not crash verify
            return [f"{what}: {kind} file {path.name} is unreadable ({exc})"]
        return [] if actual == digest else [f"{what}: {kind} file {path.name} has content hash {actual[:12]}, "
                                            f"expected {digest[:12]} (tampered or corrupted)"]

    def orphans(self, referenced: Collection[str]) -> list[Path]:
        """Files whose hash is not in `referenced`, and leftover temp files."""
        return [p for kind in KINDS for p in sorted((self.root / kind).glob("*"))
                if p.name.split(".")[0] not in referenced or p.name.startswith(".")]

    def gc(self, referenced: Collection[str]) -> list[Path]:
        """Delete the orphan files (see `orphans`); return them."""
        orphans = self.orphans(referenced)
        for p in orphans:
            p.unlink()
        if orphans:
            log.info("ledger gc: removed %d orphan file(s)", len(orphans))
        return orphans
