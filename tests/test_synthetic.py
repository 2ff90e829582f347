import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from models.synthetic import CONTENT, STYLE, TOPICS, synthetic_corpus, template_slots
from models.task import build_task
from models.tokenizer import OOV, PAD, tokenize


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus()


def test_deterministic_for_a_seed_and_different_across_seeds(corpus):
    assert synthetic_corpus() == corpus
    other = synthetic_corpus(seed=1)
    assert other != corpus
    same_user = sum(a == b for a, b in zip(corpus.users.values(), other.users.values()))
    assert same_user == 0


def test_user_depends_only_on_seed_and_index(corpus):
    small = synthetic_corpus(n_users=10)
    for user, blocks in small.users.items():
        assert corpus.users[user] == blocks


def test_shape_of_the_default_corpus(corpus):
    assert corpus.n_users == 300 == len(set(corpus.users))
    counts = [len(b) for b in corpus.users.values()]
    assert min(counts) >= 20 and max(counts) <= 80
    assert 40 <= np.mean(counts) <= 60
    assert corpus.name == "synthetic-keyboard-s0-u300"
    c = synthetic_corpus(n_users=5, seed=7, messages_per_user=(3, 3))
    assert c.n_users == 5 and all(len(b) == 3 for b in c.users.values())


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="n_users"):
        synthetic_corpus(n_users=0)
    with pytest.raises(ValueError, match="messages_per_user"):
        synthetic_corpus(messages_per_user=(5, 2))


def test_users_are_distinct(corpus):
    # no two users share their set of messages, and most messages are nobody else's
    as_sets = [frozenset(b) for b in corpus.users.values()]
    assert len(set(as_sets)) == len(as_sets)
    owners = defaultdict(set)
    for user, blocks in corpus.users.items():
        for b in blocks:
            owners[b].add(user)
    assert np.mean([len(o) == 1 for o in owners.values()]) > 0.6


def test_looks_like_short_chat_messages(corpus):
    blocks = [b for bs in corpus.users.values() for b in bs]
    lengths = np.array([len(tokenize(b)) for b in blocks])
    assert 4 <= lengths.mean() <= 12 and lengths.max() <= 30 and lengths.min() >= 1
    assert not any("{" in b or "}" in b for b in blocks)
    words = Counter(w for b in blocks for w in tokenize(b))
    assert 500 <= len(words) <= 3000, len(words)  # a few thousand distinct words at most
    assert len(TOPICS) >= 15
    for everyday in ("you", "tonight", "pizza", "work", "mum", "rain", "game"):
        assert words[everyday] > 0, everyday


def test_every_template_slot_has_a_source():
    persona_slots = {"friend", "place", "team", "game", "pet_name"}
    assert template_slots() <= set(STYLE) | set(CONTENT) | persona_slots


def test_generation_is_fast():
    start = time.perf_counter()
    synthetic_corpus(n_users=300, seed=11)
    assert time.perf_counter() - start < 2.0


def _word_vectors(groups, vocab):
    m = np.zeros((len(groups), len(vocab)))
    for i, blocks in enumerate(groups):
        for b in blocks:
            for w in tokenize(b):
                m[i, vocab[w]] += 1
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def _half_matching(groups, vocab):
    """How often a group's first half is most similar to its own second half; and mean similarities."""
    a = _word_vectors([g[0::2] for g in groups], vocab)
    b = _word_vectors([g[1::2] for g in groups], vocab)
    sim = a @ b.T
    n = len(groups)
    own = np.diag(sim).mean()
    other = (sim.sum() - np.trace(sim)) / (n * n - n)
    return float((sim.argmax(axis=1) == np.arange(n)).mean()), own, other


def test_non_iid_users_resemble_themselves_not_each_other():
    corpus = synthetic_corpus(n_users=100, seed=3)
    groups = list(corpus.users.values())
    vocab = {w: i for i, w in enumerate(sorted({w for g in groups for b in g for w in tokenize(b)}))}
    matched, own, other = _half_matching(groups, vocab)
    # the same text dealt out at random to users of the same sizes: the IID control
    blocks = [b for g in groups for b in g]
    order = np.random.default_rng(0).permutation(len(blocks))
    shuffled, start = [], 0
    for g in groups:
        shuffled.append([blocks[i] for i in order[start:start + len(g)]])
        start += len(g)
    iid_matched, iid_own, iid_other = _half_matching(shuffled, vocab)
    assert matched > 0.6 and iid_matched < 0.1  # chance is 1 %
    assert own - other > 0.25 and abs(iid_own - iid_other) < 0.05


def test_users_have_favourite_topics(corpus):
    # words of a few topic lists: each user's share of them differs wildly across users
    foods = set(w for f in CONTENT["food"] for w in tokenize(f))
    shares = []
    for blocks in corpus.users.values():
        toks = [w for b in blocks for w in tokenize(b)]
        shares.append(sum(w in foods for w in toks) / len(toks))
    shares = np.array(shares)
    assert np.quantile(shares, 0.9) > 5 * max(np.quantile(shares, 0.1), 1e-3)


def test_enough_structure_to_learn_next_words():
    """A bigram count model, trained on the train split, must beat the unigram baseline by far
    on top-3; a small LSTM has at least this much structure to find."""
    task = build_task(synthetic_corpus(n_users=120, seed=5))
    x, y = task.pooled_train()
    tx, ty = task.pooled_test()
    v = task.vocab.size
    keep = y != PAD
    bigram = np.zeros((v, v))
    np.add.at(bigram, (x[keep], y[keep]), 1)
    unigram_top3 = np.argsort(-bigram.sum(axis=0))[:3]
    bigram_top3 = np.argsort(-bigram, axis=1)[:, :3]
    scored = (ty != PAD) & (ty != OOV)
    uni = np.isin(ty[scored], unigram_top3).mean()
    bi = (bigram_top3[tx[scored]] == ty[scored][:, None]).any(axis=1).mean()
    assert uni < 0.25
    assert bi > 0.45 and bi > 2 * uni
