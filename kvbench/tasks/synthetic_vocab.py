"""Vocabulary of the embedded kvbench-tiny model, shared by the synthetic task generator and the model builder.

The vocabulary is a fixed, ordered list of whitespace-free words:

* special tokens ``<pad>`` (id 0), ``<s>``, ``</s>``, ``<unk>``;
* punctuation and question words used by needles and questions;
* filler words for a tiny sentence grammar (determiners, adjectives, nouns, verbs, adverbs, prepositions);
* ``NAMES``: keys of the needles (first names);
* ``CODES``: answer pieces ``k0`` ... ``k511``.

Only ``NAMES`` and ``CODES`` are *content* tokens: the model's induction head can match on them. Every other token
is invisible to the matching mechanism, which is what lets the model find a needle among thousands of filler tokens.
Changing anything here changes the token ids and therefore requires rebuilding the embedded model.
"""

from __future__ import annotations

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)

#: Punctuation and the words of needles and questions.
PUNCT: tuple[str, ...] = (".", ",", ":", "?")
QUESTION_WORDS: tuple[str, ...] = ("question", "what", "is", "code", "of", "remember")

DETERMINERS: tuple[str, ...] = ("the", "a", "every", "one", "that", "this")
ADJECTIVES: tuple[str, ...] = (
    "green", "small", "old", "quiet", "bright", "heavy", "warm", "cold", "tall", "slow",
    "red", "blue", "soft", "dark", "round", "young", "happy", "calm", "wide", "long",
)  # fmt: skip
NOUNS: tuple[str, ...] = (
    "grass", "river", "house", "garden", "bird", "tree", "stone", "road", "cloud", "window",
    "horse", "field", "lake", "door", "city", "forest", "boat", "hill", "bridge", "lamp",
    "table", "book", "apple", "dog", "cat", "train", "market", "mountain", "sky", "village",
)  # fmt: skip
VERBS: tuple[str, ...] = (
    "sees", "likes", "follows", "finds", "watches", "passes", "crosses", "touches", "meets", "holds",
    "leaves", "reaches", "carries", "paints", "hears", "remembers",
)  # fmt: skip
ADVERBS: tuple[str, ...] = ("slowly", "quickly", "again", "today", "often", "quietly", "later", "there")
PREPOSITIONS: tuple[str, ...] = ("in", "near", "under", "over", "behind", "beside", "through")

FILLER_WORDS: tuple[str, ...] = DETERMINERS + ADJECTIVES + NOUNS + VERBS + ADVERBS + PREPOSITIONS

NAMES: tuple[str, ...] = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "karl", "laura", "mallory", "nina", "oscar", "peggy", "quentin", "rupert", "sybil", "trent",
    "ursula", "victor", "walter", "xena", "yvonne", "zack", "anna", "ben", "clara", "dylan",
    "emma", "felix", "gina", "hugo", "iris", "jack", "kate", "leo", "mia", "noah",
    "olga", "paul", "quinn", "rosa", "sam", "tina", "umar", "vera", "will", "yara",
    "zoe", "adam", "bella", "chris", "diana", "eric", "fiona", "george", "hannah", "isaac",
    "julia", "kevin", "lucy", "marco", "nora", "owen", "pia", "ralph", "sara", "tom",
    "ula", "vince", "wanda", "yusuf", "zara", "amir", "bruno", "chloe", "dora", "elias",
    "freya", "gus", "helen", "igor", "jonas", "kira", "lars", "maya", "nils", "otto",
    "petra", "rita", "simon", "theo", "uma", "viktor", "wendy", "xavier", "yuki", "zeno",
    "agnes", "boris", "celia", "dmitri", "edith", "fabio", "greta", "henry", "ingrid", "jorge",
    "klaus", "lena", "milo", "nadia", "oliver", "paula", "raul", "selma", "tobias", "ida",
)  # fmt: skip
N_CODES = 512
CODES: tuple[str, ...] = tuple(f"k{i}" for i in range(N_CODES))

CONTENT_WORDS: tuple[str, ...] = NAMES + CODES


def vocabulary() -> list[str]:
    """The ordered vocabulary; a word's index is its token id (``<pad>`` is 0)."""
    words = list(SPECIALS + PUNCT + QUESTION_WORDS + FILLER_WORDS + NAMES + CODES)
    if len(set(words)) != len(words):
        raise ValueError("duplicate word in the kvbench-tiny vocabulary")
    return words
