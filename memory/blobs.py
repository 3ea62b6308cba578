"""The ledger's tensor files: content-addressed safetensors beside its database, and the errors it raises.

    <root>/deltas/<hash>.safetensors   low-rank factors of one batch (EditDelta; hash = EditDelta.content_hash)
    <root>/keys/<hash>.safetensors     the batch's keys K per layer (hash = hash_tensors)
    <root>/base/<hash>.safetensors     base weights of an edited layer, stored once (hash = hash_tensors)

A file is written to a temp name, fsynced and renamed into place, so it is either whole or absent;
writing one that is already there is a no-op. Files no database row refers to (a crash between the
write and the commit) are orphans, listed and removed here. Layer fingerprints (a norm and seeded
projections of a weight) let the ledger check rebuilt weights without storing them again.
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

FINGERPRINT_RTOL = 2e-5  # tolerated relative difference of layer fingerprints (device round-off)
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


def layer_fingerprint(w: torch.Tensor, layer: int) -> list[float]:
    """Frobenius norm and 4 seeded Gaussian projections of a weight: robust to device round-off only."""
    w64 = w.detach().double().cpu().flatten()
    gen = torch.Generator().manual_seed(7919 + layer)
    proj = torch.randn(4, w64.numel(), generator=gen, dtype=torch.float64) @ w64
    return [float(w64.norm())] + proj.tolist()


def fingerprints_match(a: Sequence[float], b: Sequence[float]) -> bool:
    scale = max(abs(a[0]), abs(b[0]), 1e-12)
    return len(a) == len(b) and all(abs(x - y) <= FINGERPRINT_RTOL * scale for x, y in zip(a, b))


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
