"""Rule-based text augmentation for distillation (Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT
into Simple Neural Networks"; TinyBERT's word replacement).

Each augmented text comes from one training text, word by word: with probability ``p_mask`` a word becomes the
mask token, else with probability ``p_replace`` it becomes one of its replacements (a neighbour in the teacher's
embedding space, :func:`embedding_neighbours`, or a word the teacher's masked-LM head predicts in its place), and
then, with probability ``p_ngram``, only a random window of ``n`` words is kept (``n`` drawn from
``ngram_range``). Texts that come out equal to their source, or to one already made, are not kept. The teacher
labels every augmented text; the student never sees a gold label for one, so the operators may change its meaning.

Everything is drawn from one ``random.Random`` seeded by the caller, so a seed gives the same texts every time.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

Words = list[str]
# (words, indices of the words to replace) -> one replacement per index; None where it has none
Replacer = Callable[[Sequence[Words], Sequence[Sequence[int]]], list[list[str | None]]]


@dataclass(frozen=True)
class RuleAugmentation:
    """The operators' probabilities (see the module docstring)."""

    p_mask: float = 0.1
    p_replace: float = 0.1
    p_ngram: float = 0.25
    ngram_range: tuple[int, int] = (1, 5)
    mask_token: str = "[MASK]"


def augment_words(
    rows: Sequence[Words],
    copies: int,
    spec: RuleAugmentation,
    replace: Replacer | None,
    seed: int,
    *,
    max_tries: int = 3,
) -> list[tuple[int, Words]]:
    """Up to ``copies`` distinct augmented versions of each row, as ``(source row index, words)``.

    Drafts are made in rounds: the first drafts ``copies`` per row, each later one only the copies still missing
    (a draft equal to its source or to an earlier copy is not kept), up to ``max_tries`` rounds; so the replacer
    (a masked-LM forward per text, on that path) sees about as many texts as are kept. A row too short to change
    (one word, nothing drawn) may get fewer.
    """
    rng = random.Random(seed)
    made: list[set[tuple[str, ...]]] = [{tuple(words)} for words in rows]  # each row's source and its copies
    out: list[tuple[int, Words]] = []
    wanted = {index: copies for index in range(len(rows))}
    for _ in range(max_tries):
        drafts = [index for index, missing in wanted.items() for _ in range(missing)]
        if not drafts:
            break
        plans = [(index, *_draw(rows[index], spec, rng)) for index in drafts]  # (row, masked flags, replaced)
        choices = replace([rows[i] for i, _, _ in plans], [r for _, _, r in plans]) if replace is not None else None
        for number, (index, masked, replaced) in enumerate(plans):
            new = [spec.mask_token if flag else word for word, flag in zip(rows[index], masked, strict=True)]
            for position, word in zip(replaced, choices[number] if choices is not None else [], strict=False):
                if word is not None:
                    new[position] = word
            if len(new) > 1 and rng.random() < spec.p_ngram:
                low, high = spec.ngram_range
                n = rng.randint(min(low, len(new)), min(high, len(new)))
                begin = rng.randint(0, len(new) - n)
                new = new[begin : begin + n]
            if tuple(new) not in made[index]:
                made[index].add(tuple(new))
                out.append((index, new))
                wanted[index] -= 1
        wanted = {index: missing for index, missing in wanted.items() if missing > 0}
    return sorted(out, key=lambda item: item[0])


def _draw(words: Words, spec: RuleAugmentation, rng: random.Random) -> tuple[list[bool], list[int]]:
    """Which words one draft masks, and which it replaces (exclusive: a masked word is not replaced)."""
    masked, replaced = [], []
    for position in range(len(words)):
        draw = rng.random()
        masked.append(draw < spec.p_mask)
        if not masked[-1] and draw < spec.p_mask + spec.p_replace:
            replaced.append(position)
    return masked, replaced


def embedding_neighbours(
    vocab: Mapping[str, int], weight: torch.Tensor, words: Iterable[str], *, k: int = 10
) -> dict[str, list[str]]:
    """For each of ``words`` that is one whole-word piece of ``vocab``: its ``k`` nearest whole-word pieces by the
    cosine of their rows of ``weight`` (the teacher's input embedding), itself left out.

    Only alphabetic pieces take part on either side (no sub-word ``##`` pieces, specials or punctuation).
    """
    candidates = [token for token in vocab if token.isalpha()]
    if not candidates:
        return {}
    ids = torch.tensor([vocab[token] for token in candidates])
    table = torch.nn.functional.normalize(weight.detach().float()[ids], dim=-1)  # (N, D)
    position = {token: i for i, token in enumerate(candidates)}
    queries = sorted({word.lower() for word in words if word.lower() in position})
    out: dict[str, list[str]] = {}
    for start in range(0, len(queries), 1024):
        chunk = queries[start : start + 1024]
        scores = table[[position[w] for w in chunk]] @ table.T  # (q, N)
        scores[torch.arange(len(chunk)), [position[w] for w in chunk]] = -2.0  # not itself
        top = scores.topk(min(k, len(candidates) - 1), dim=-1).indices
        for word, row in zip(chunk, top.tolist(), strict=True):
            out[word] = [candidates[i] for i in row]
    return out


def neighbour_replacer(neighbours: Mapping[str, Sequence[str]], seed: int) -> Replacer:
    """A :data:`Replacer` that picks one of a word's neighbours at random (None for a word without any)."""
    rng = random.Random(seed)

    def replace(rows: Sequence[Words], positions: Sequence[Sequence[int]]) -> list[list[str | None]]:
        out: list[list[str | None]] = []
        for words, indices in zip(rows, positions, strict=True):
            picks: list[str | None] = []
            for i in indices:
                options = neighbours.get(words[i].lower())
                picks.append(rng.choice(options) if options else None)
            out.append(picks)
        return out

    return replace
