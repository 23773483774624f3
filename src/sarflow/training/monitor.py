"""Health of a self-supervised embedding while it trains: collapse statistics and an online kNN probe.

- `embedding_stats`: the effective rank of the centred embeddings (RankMe: exp of the entropy of
  the normalised singular values), the mean per-dimension standard deviation of the L2-normalised
  embeddings times sqrt(dim) (about 1 for embeddings spread over the sphere, 0 when every chip
  gets the same vector) and the median pairwise cosine of the raw embeddings.
- `collapse_reason`: the embedding has collapsed when its median pairwise cosine is above
  `COLLAPSE_COSINE`, its effective rank below `COLLAPSE_RANK`, or its normalised std below
  `COLLAPSE_STD`; the reason names the statistic and its value.
- `knn_accuracy`: a k-nearest-neighbour (cosine) probe, the train split as the memory bank and
  the val split as queries, beside the accuracy of predicting the train split's commonest class.
- `SSLMonitor`: a Lightning callback that embeds fixed train/val chips of the store with the
  encoder being trained (the embedding it will serve) before training, every `every` steps and at
  the end, logs `val/*` metrics and warns loudly on collapse. The kNN labels are each declared
  categorical label source's majority class per chip (`data.chip_labels.label_features`).
"""

from __future__ import annotations

import logging
import sys

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)

COLLAPSE_COSINE = 0.95
COLLAPSE_RANK = 2.0
COLLAPSE_STD = 0.05
KNN_K = 10


def embedding_stats(z: np.ndarray) -> dict[str, float]:
    """effective_rank, std (normalised, ~1 spread, 0 collapsed) and median_cosine of (n, d) embeddings."""
    z = np.asarray(z, np.float64)
    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"embedding statistics need two or more embeddings, got shape {z.shape}")
    centred = z - z.mean(axis=0, keepdims=True)
    s = np.linalg.svd(centred, compute_uv=False)
    total = s.sum()
    if total <= 1e-12 * max(1.0, np.abs(z).max()):
        rank = 0.0
    else:
        p = s / total
        p = p[p > 0]
        rank = float(np.exp(-(p * np.log(p)).sum()))
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    unit = z / np.maximum(norms, 1e-12)
    std = float(unit.std(axis=0).mean() * np.sqrt(z.shape[1]))
    cos = unit @ unit.T
    iu = np.triu_indices(len(z), k=1)
    return {"effective_rank": rank, "std": std, "median_cosine": float(np.median(cos[iu]))}


def collapse_reason(stats: dict[str, float]) -> str | None:
    """Why the embedding counts as collapsed (None when it does not)."""
    if stats["median_cosine"] > COLLAPSE_COSINE:
        return f"median pairwise cosine {stats['median_cosine']:.3f} > {COLLAPSE_COSINE}"
    if stats["effective_rank"] < COLLAPSE_RANK:
        return f"effective rank {stats['effective_rank']:.2f} < {COLLAPSE_RANK}"
    if stats["std"] < COLLAPSE_STD:
        return f"normalised per-dimension std {stats['std']:.3f} < {COLLAPSE_STD}"
    return None


def knn_accuracy(bank: np.ndarray, bank_y: np.ndarray, query: np.ndarray, query_y: np.ndarray,
                 k: int = KNN_K) -> tuple[float, float]:
    """(accuracy, chance) of a cosine kNN vote (ties to the larger summed similarity); chance is
    the query share of the bank's commonest class."""
    bank, query = np.asarray(bank, np.float64), np.asarray(query, np.float64)
    bank = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    k = min(k, len(bank))
    sim = query @ bank.T
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    classes = np.unique(bank_y)
    votes = np.zeros((len(query), len(classes)))
    for j, c in enumerate(classes):
        hit = bank_y[nn] == c
        votes[:, j] = hit.sum(axis=1) + 1e-3 * (np.take_along_axis(sim, nn, axis=1) * hit).sum(axis=1)
    pred = classes[votes.argmax(axis=1)]
    values, counts = np.unique(bank_y, return_counts=True)
    majority = values[counts.argmax()]
    return float((pred == query_y).mean()), float((query_y == majority).mean())


def chip_classes(store: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per declared categorical label source: the majority class code of each of the store `rows`
    (sorted; -1 where the chip has no labelled pixel). Only those rows' label chips are read (the
    monitor's few hundred chips, not a continental store's labels)."""
    from sarflow.data.chipstore import chip_shape, label_sources, open_chip_group, read_masked

    group = open_chip_group(store)
    rows = np.asarray(rows, np.int64)
    out = {}
    for lab in label_sources(group, store):
        if lab.kind != "categorical" or not lab.codes:
            continue
        arr = group[lab.name]
        flat = read_masked(arr, rows, bands=[0]).reshape(len(rows), int(np.prod(chip_shape(arr)[2:])))
        codes = np.asarray(lab.codes, np.float32)
        counts = np.stack([(flat == c).sum(axis=1) for c in codes], axis=1) if len(rows) else np.zeros((0, len(codes)))
        out[lab.name] = np.where(counts.sum(axis=1) > 0, np.asarray(lab.codes)[counts.argmax(axis=1)], -1)
    return out


class SSLMonitor(L.Callback):
    """Embeds up to `max_chips` train and val chips (no augmentation) with the module's served
    embedding (`module.embed_batch`) at step 0, every `every` steps and at the end of training;
    logs `val/effective_rank`, `val/std`, `val/median_cosine`, `val/collapse` and, per categorical
    label with two or more classes in both splits, `val/knn_<label>` and `val/knn_<label>_chance`.
    `history` keeps every check; `last` the latest."""

    def __init__(self, store: str, specs: list, min_valid: float, every: int, max_chips: int = 512,
                 batch_size: int = 64):
        from sarflow.data.chipstore import read_chip_table
        from sarflow.training.data import LoaderConfig, ShardChipDataset

        self.every, self.batch_size = max(1, int(every)), batch_size
        self.history: list[dict] = []
        table = read_chip_table(store)
        self.sets = {}
        for split in ("train", "val"):
            if not (table["split"] == split).any():
                continue
            ds = ShardChipDataset(LoaderConfig(store=store, modalities=specs, split=split, min_valid=min_valid,
                                               augment=None, shuffle_buffer=1, cache_mb=0))
            n = len(ds)
            pick = set(np.linspace(0, n - 1, min(n, max_chips)).round().astype(int).tolist()) if n else set()
            rows = ds.view.indexes[sorted(pick)]
            keep = np.zeros_like(ds.keep)
            keep[rows] = True  # read only the shards of the chosen chips
            S = ds.view.shard
            ds.keep, ds.shards = keep, [i for i in ds.shards if keep[i * S:(i + 1) * S].any()]
            samples = sorted(ds, key=lambda s: int(s["index"]))
            if samples:
                self.sets[split] = samples
        # per split, each declared categorical label's class of every monitored chip (in sample order)
        self.labels = {split: chip_classes(store, np.array([int(x["index"]) for x in samples]))
                       for split, samples in self.sets.items()}
        if "val" not in self.sets:
            log.warning("%s: no val chip: the embedding monitor uses the train chips and the kNN probe is not evaluable", store)

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}

    @torch.no_grad()
    def _embed(self, module, samples: list[dict]) -> np.ndarray:
        out = []
        for i in range(0, len(samples), self.batch_size):
            part = samples[i:i + self.batch_size]
            batch = {k: torch.stack([torch.as_tensor(s[k]) for s in part]).to(module.device)
                     for k in part[0] if k != "index"}
            out.append(module.embed_batch(batch).float().cpu().numpy())
        return np.concatenate(out)

    def check(self, module, step: int) -> dict:
        was_training = module.training
        module.eval()
        try:
            emb = {split: self._embed(module, s) for split, s in self.sets.items()}
        finally:
            module.train(was_training)
        # the val chips, else the train chips when val has fewer than two (a store too small for a val split)
        query = next((e for e in (emb.get("val"), emb.get("train")) if e is not None and len(e) >= 2), None)
        if query is None:
            nan = float("nan")
            result = {"step": step, "effective_rank": nan, "std": nan, "median_cosine": nan, "collapse": False,
                      "collapse_reason": None, "knn": {},
                      "not_measurable": "fewer than two chips to compare in val and in train"}
            if not self.history:
                log.warning("embedding monitor: not measurable (fewer than two val and train chips)")
            self.history.append(result)
            return result
        if not all(np.isfinite(e).all() for e in emb.values()):
            nan = float("nan")
            result = {"step": step, "effective_rank": nan, "std": nan, "median_cosine": nan, "collapse": True,
                      "collapse_reason": "the embedding is not finite (NaN or inf)", "knn": {}}
            self.history.append(result)
            return result
        stats = embedding_stats(query)
        reason = collapse_reason(stats)
        result = {"step": step, **stats, "collapse": reason is not None, "collapse_reason": reason, "knn": {}}
        if "train" in emb and "val" in emb:
            for name, by in self.labels["train"].items():
                qy = self.labels["val"][name]
                keep_b, keep_q = by >= 0, qy >= 0
                if len(np.unique(by[keep_b])) < 2 or len(np.unique(qy[keep_q])) < 2:
                    continue  # one class: a kNN accuracy would measure nothing
                acc, chance = knn_accuracy(emb["train"][keep_b], by[keep_b], emb["val"][keep_q], qy[keep_q])
                result["knn"][name] = {"accuracy": acc, "chance": chance, "val_chips": int(keep_q.sum())}
        self.history.append(result)
        metrics = {f"val/{k}": float(result[k]) for k in ("effective_rank", "std", "median_cosine")}
        metrics["val/collapse"] = float(result["collapse"])
        for name, r in result["knn"].items():
            metrics[f"val/knn_{name}"], metrics[f"val/knn_{name}_chance"] = r["accuracy"], r["chance"]
        trainer = getattr(module, "_trainer", None)
        if trainer is not None and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)
        return result

    def on_train_start(self, trainer, module):
        self.check(module, 0)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 and step < trainer.max_steps:
            self.check(module, step)

    def on_train_end(self, trainer, module):
        r = self.check(module, trainer.global_step)
        if r["collapse"]:
            msg = (f"WARNING: the {type(module).__name__} embedding has COLLAPSED ({r['collapse_reason']}): "
                   "it carries no information about the chips; do not use this encoder")
            log.warning(msg)
            print(msg, file=sys.stderr, flush=True)
