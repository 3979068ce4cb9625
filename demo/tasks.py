"""The demo's synthetic multi-intent task suite (pure Python, no torch).

A composite instruction names one intent of each group and an input of letters::

    instruction: count animal loud input: c a b output: hey | cat ant bee | three

The answer has three fields, one per group, separated by ``|``:

- style experts know a tone, written as the opening word (loud ``hey``, curious ``hmm``, calm ``well``);
- domain experts know a vocabulary: each input letter is written as a word of that domain (a -> ant);
- functional experts know a computation on the input: its length (count), the parity of its
  length (parity), whether it holds a vowel (vowel).

A composite needs one expert of each group, and each expert's skill is needed in its own field.
Each group also has a *neutral* intent (copy / same / plain) that no expert owns: the domain field
then repeats the letters and the other two fields hold ``-``. An expert's own single-intent data sets
the other two aspects to their neutral value, so the instruction stays well-formed and the expert
learns its own aspect only. The base model is pre-trained on generic text and on the neutral answer
(``- | `` the letters echoed `` | -``) under any instruction words, never on any expert's intent, so it
knows the format but fails every composite.

Why fields (a disclosed task-design choice): the first suite of this demo chained the aspects into one
sequence, ``style(domain(function(letters)))`` with functions such as reverse and wrappers such as
``[ ... ]``. Every expert solved its own task, but the separately trained LoRA experts did not compose:
even forced to the intended experts at full weight, exact match on composites was 0, because an
expert that moves the input pointer or shifts where the answer starts rewrites the very mechanism the
other experts were trained on. The paper's groups are orthogonal aspects of an answer (what to do,
which knowledge, which style); giving each aspect its own field of the answer is that reading made
literal, and it is what lets experts trained apart work together. The order of the fields matters
too: an expert reads the fields written before its own, and it has only ever seen them neutral. With
the tone last (after the functional field) the style expert did not fire once the functional field
was filled in; opening with the tone gives it a context that no other expert changes, and the
domain's word mapping and the functional field (read after the content) proved robust to what
precedes them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

LETTERS: tuple[str, ...] = ("a", "b", "c", "d", "e", "f", "g", "h")
VOWELS = frozenset({"a", "e"})
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}

# functional intent -> the word it computes from the input letters
FUNCTIONS = {
    "count": lambda xs: NUMBERS[len(xs)],
    "parity": lambda xs: "even" if len(xs) % 2 == 0 else "odd",
    "vowel": lambda xs: "yes" if VOWELS & set(xs) else "no",
}
DOMAINS: dict[str, tuple[str, ...]] = {
    "animal": ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"),
    "color": ("amber", "blue", "cyan", "drab", "ebony", "fawn", "gold", "hazel"),
    "fruit": ("apple", "banana", "cherry", "date", "elder", "fig", "grape", "hop"),
}
STYLES: dict[str, str] = {"loud": "hey", "curious": "hmm", "calm": "well"}
NEUTRAL = {"functional": "copy", "domain": "same", "style": "plain"}
GROUP_ORDER = ("functional", "domain", "style")
MARKERS = ("instruction:", "input:", "output:")
SEPARATOR, EMPTY = "|", "-"


@dataclass(frozen=True)
class SuiteSpec:
    """Which intents make up the suite; each intent is one expert, named after its intent word."""

    functional: tuple[str, ...] = ("count", "parity", "vowel")
    domain: tuple[str, ...] = ("animal", "color", "fruit")
    style: tuple[str, ...] = ("loud", "curious")
    min_len: int = 3
    max_len: int = 6

    def __post_init__(self) -> None:
        for group, names, known in (
            ("functional", self.functional, FUNCTIONS),
            ("domain", self.domain, DOMAINS),
            ("style", self.style, STYLES),
        ):
            if not names:
                raise ValueError(f"suite group {group!r} has no intent")
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"unknown {group} intents {unknown}; known: {sorted(known)}")
        if not 2 <= self.min_len <= self.max_len <= len(LETTERS):
            raise ValueError("need 2 <= min_len <= max_len <= 8")

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Ordered ``{group: (expert names...)}``; expert name == intent word."""
        return {"functional": self.functional, "domain": self.domain, "style": self.style}

    @property
    def n_max(self) -> int:
        return max(len(v) for v in self.groups.values())


QUICK_SUITE = SuiteSpec(functional=("count", "parity"), domain=("animal", "color", "fruit"), style=("loud", "curious"))
DEFAULT_SUITE = SuiteSpec()


def answer(letters: list[str], function: str, domain: str, style: str) -> list[str]:
    """The reference output tokens: ``style field | domain field | functional field``."""
    if domain == "same":
        content = list(letters)
    else:
        table = dict(zip(LETTERS, DOMAINS[domain]))
        content = [table[x] for x in letters]
    summary = EMPTY if function == "copy" else FUNCTIONS[function](list(letters))
    mark = EMPTY if style == "plain" else STYLES[style]
    return [mark, SEPARATOR, *content, SEPARATOR, summary]


def make_example(letters: list[str], function: str, domain: str, style: str) -> dict:
    """One example in the toolkit's JSONL shape: prompt, response, intents (expert names)."""
    prompt = f"instruction: {function} {domain} {style} input: {' '.join(letters)} output:"
    response = " ".join(answer(letters, function, domain, style))
    intents = [i for i in (function, domain, style) if i not in NEUTRAL.values()]
    return {"prompt": prompt, "response": response, "intents": intents}


def _letters(rng: random.Random, spec: SuiteSpec) -> list[str]:
    n = rng.randint(spec.min_len, spec.max_len)
    return rng.sample(LETTERS, n)  # distinct letters


def _key(letters: list[str]) -> str:
    return "".join(letters)


@dataclass
class Splits:
    """Disjoint inputs: held-out composite inputs never appear in any training split."""

    expert_train: dict[str, list[dict]] = field(default_factory=dict)  # expert -> single-intent data
    expert_eval: dict[str, list[dict]] = field(default_factory=dict)
    router_train: list[dict] = field(default_factory=list)  # composite instructions
    router_eval: list[dict] = field(default_factory=list)  # for the router's own early look
    test: list[dict] = field(default_factory=list)  # held-out composite instructions

    def general_train(self) -> list[dict]:
        """All single-intent data: what the pre-merged general expert is trained on."""
        return [ex for name in sorted(self.expert_train) for ex in self.expert_train[name]]


def build_splits(
    spec: SuiteSpec, *, n_expert: int, n_router: int, n_router_eval: int, n_test: int, seed: int = 0
) -> Splits:
    """Sample the suite. Input letter strings are partitioned between expert data, router data
    and the held-out test set, so every test input is new to every trained component."""
    rng = random.Random(seed)
    pool: list[list[str]] = []
    seen: set[str] = set()
    # 8 letters, lengths 3..6 distinct: far more strings than we need; draw a fixed pool.
    target = n_expert + n_router + n_router_eval + n_test
    target = max(target, 64)
    while len(pool) < target * 2 and len(pool) < 30000:
        xs = _letters(rng, spec)
        if _key(xs) not in seen:
            seen.add(_key(xs))
            pool.append(xs)
    rng.shuffle(pool)
    # Thirds of the pool: expert inputs, router inputs, test inputs.
    third = len(pool) // 3
    expert_pool, router_pool, test_pool = pool[:third], pool[third : 2 * third], pool[2 * third :]
    splits = Splits()
    for group, names in spec.groups.items():
        for name in names:
            intent = dict(NEUTRAL)
            intent[group] = name
            data = [
                make_example(rng.choice(expert_pool), intent["functional"], intent["domain"], intent["style"])
                for _ in range(n_expert + n_test // 4)
            ]
            splits.expert_train[name] = data[:n_expert]
            splits.expert_eval[name] = data[n_expert:]
    combos = composite_intents(spec)

    def composite(pool_: list[list[str]], n: int) -> list[dict]:
        out = []
        for i in range(n):
            f, d, s = combos[i % len(combos)]  # balanced over intent triples
            out.append(make_example(rng.choice(pool_), f, d, s))
        rng.shuffle(out)
        return out

    splits.router_train = composite(router_pool, n_router)
    splits.router_eval = composite(router_pool, n_router_eval)
    splits.test = composite(test_pool, n_test)
    return splits


def composite_intents(spec: SuiteSpec) -> list[tuple[str, str, str]]:
    """Every (functional, domain, style) triple of the suite."""
    return [(f, d, s) for f in spec.functional for d in spec.domain for s in spec.style]


def generic_text(rng: random.Random, n: int, spec: SuiteSpec, max_words: int = 12) -> list[str]:
    """Pre-training text for the base model: an echo of any content words under any instruction
    words (the all-neutral one among them), and random word strings. Never an expert's skill."""
    words = list(vocabulary_words())
    content = list(LETTERS) + [w for d in DOMAINS.values() for w in d]
    # The echo's instruction slots hold any three words: the base learns the format and to repeat
    # its input whatever the instruction says; what an instruction means is the experts' business.
    slot_words = [w for w in words if w not in MARKERS]
    lines = []
    for i in range(n):
        if i % 4 != 3:
            # with repeats and domain words: the base echoes any content by position
            xs = rng.choices(content, k=rng.randint(spec.min_len, spec.max_len))
            ins = " ".join(rng.choice(slot_words) for _ in range(3)) if i % 4 else "copy same plain"
            neutral = " ".join([EMPTY, SEPARATOR, *xs, SEPARATOR, EMPTY])
            lines.append(f"instruction: {ins} input: {' '.join(xs)} output: {neutral}")
        else:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, max_words))))
    return lines


def vocabulary_words() -> list[str]:
    """Every word the suite can use (the tokenizer's vocabulary, before special tokens)."""
    words = list(MARKERS) + list(NEUTRAL.values()) + list(FUNCTIONS) + list(DOMAINS) + list(STYLES)
    words += list(LETTERS) + [w for d in DOMAINS.values() for w in d]
    words += [SEPARATOR, EMPTY, *NUMBERS.values(), "even", "odd", "yes", "no", *STYLES.values()]
    return list(dict.fromkeys(words))


def digest(examples: list[dict]) -> str:
    """sha256 of the examples as JSONL, so a report names exactly the data it used."""
    h = hashlib.sha256()
    for ex in examples:
        h.update((json.dumps(ex, sort_keys=True) + "\n").encode())
    return h.hexdigest()


def write_jsonl(path, examples: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(ex) + "\n" for ex in examples)
