"""RULER (NVIDIA/RULER, ``scripts/data/synthetic``): the 13 tasks synthesised in the evaluated model's tokens.

Every sample is sized like RULER's ``prepare.py``: a binary search over the number of haystack units (essay words,
noise sentences, distractor needles, list words, documents) keeps ``len(tokens(input + answer_prefix)) +
tokens_to_generate <= max_seq_length``, counted with the run's tokenizer without special tokens (RULER's
``HFTokenizer.text_to_tokens``). The prompt is RULER's ``base`` model template (the task template itself); with
``model.chat_template`` the pipeline wraps context + question in the model's chat template and puts
``answer_prefix`` after it, as RULER's ``model_template.format(task_template) + answer_prefix`` does.

A sample is one RULER line: ``context`` = the task template up to and including the haystack, the question = the
rest of the template, ``Question.answer_prefix`` = RULER's ``answer_prefix``, ``answers`` = ``outputs``.

Data: the synthetic tasks need only the tokenizer and, for ``essay`` haystacks, Paul Graham's essays
(``<data_dir>/PaulGrahamEssays.json``, RULER's ``{"text": ...}`` file, or NeedleBench's ``PaulGrahamEssays.jsonl``
copy of the same essays, which ``scripts/prepare_data.py ruler`` downloads). ``essay: synthetic`` replaces the
essay by the embedded suite's filler sentences (offline, any tokenizer; not RULER's haystack, so scores are not
comparable). qa_1 / qa_2 read RULER's release files ``squad.json`` (SQuAD 2.0 dev) and ``hotpotqa.json`` (HotpotQA
dev distractor) from ``data_dir``, read with ``json`` as RULER's ``read_squad`` / ``read_hotpotqa`` do (nested
release JSON, not a flat table for ``datasets``).

Checked against RULER's own scripts (c3f5e3b, run with the same tokenizer and essay text): the same sample lengths,
haystack sizes, needle / list / word counts, answer prefixes and gold outputs for all 13 tasks at 1024 and 4096
tokens (up to RULER's random draws; the search granularity and shrink step are RULER's ``incremental``).

Deviations from RULER's scripts (none changes the task definition):
  * randomness: one ``random.Random`` per (task, length, sample) instead of RULER's global seeds, so a sample does
    not depend on the other lengths or on ``limit``; RULER's fixed-seed shuffles (``Random(random_seed)``) are kept.
  * sentence splitting of the essay uses nltk's Punkt English model when installed (RULER's ``sent_tokenize``),
    else an untrained Punkt tokenizer (no abbreviation list); the choice is recorded in ``Sample.meta``.
  * cwe draws from the wonderwords lists only; above ~9K distinct words (about 128K tokens) RULER switches to its
    ``english_words.json``, which kvbench does not ship: such a length is one clear error.
  * ``remove_newline_tab`` and ``model_template_token`` (NeMo-Skills options) are not offered.
"""

from __future__ import annotations

import json
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError
from kvbench.tasks import synthetic
from kvbench.tasks.base import Question, Sample
from kvbench.tasks.download import download
from kvbench.tasks.hub import DataMissingError, fetch_hub_files, missing_message

BENCHMARK = "ruler"
DEFAULT_SEED = 42

#: RULER ``scripts/data/synthetic/constants.py`` (templates, answer prefixes, tokens to generate).
TEMPLATES: dict[str, dict[str, Any]] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                    "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                    "magic {type_needle_v} for {query} mentioned in the provided text?",
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                         "variables are assigned the value {query}, they are: ",
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                    "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                    "above list?",
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most "
                    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                    "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                    "text?",
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": "Answer the question based on the given documents. Only give me the answer and do not output any "
                    "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
                    "the given documents. Only give me the answer and do not output any other words.\n\nQuestion: "
                    "{query}",
        "answer_prefix": " Answer:",
    },
}

#: RULER ``scripts/synthetic.yaml``: the 13 tasks and their arguments.
TASKS: dict[str, dict[str, Any]] = {
    "niah_single_1": {"task": "niah", "type_haystack": "noise", "type_needle_k": "words", "type_needle_v": "numbers"},
    "niah_single_2": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "numbers"},
    "niah_single_3": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words", "type_needle_v": "uuids"},
    "niah_multikey_1": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words",
                        "type_needle_v": "numbers", "num_needle_k": 4},
    "niah_multikey_2": {"task": "niah", "type_haystack": "needle", "type_needle_k": "words",
                        "type_needle_v": "numbers"},
    "niah_multikey_3": {"task": "niah", "type_haystack": "needle", "type_needle_k": "uuids", "type_needle_v": "uuids"},
    "niah_multivalue": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words",
                        "type_needle_v": "numbers", "num_needle_v": 4},
    "niah_multiquery": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words",
                        "type_needle_v": "numbers", "num_needle_q": 4},
    "vt": {"task": "variable_tracking", "type_haystack": "noise", "num_chains": 1, "num_hops": 4},
    "cwe": {"task": "common_words_extraction", "freq_cw": 30, "freq_ucw": 3, "num_cw": 10},
    "fwe": {"task": "freq_words_extraction", "alpha": 2.0},
    "qa_1": {"task": "qa", "dataset": "squad"},
    "qa_2": {"task": "qa", "dataset": "hotpotqa"},
}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)).astype(int)
DOCUMENT_PROMPT = "Document {i}:\n{document}"

#: Release files (``scripts/data/synthetic/json/download_qa_dataset.sh``) and the essay source.
QA_FILES = {
    "squad": ("squad.json", "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json"),
    "hotpotqa": ("hotpotqa.json", "https://huggingface.co/datasets/namlh2004/hotpotqa/resolve/"
                                  "7e54db4656209750ff487f6fdf8e39a66dba136b/hotpot_dev_distractor_v1.json"),
}
#: The essay haystack, from NeedleBench's hub dataset at ``main`` (unpinned there too, see
#: ``kvbench.tasks.needlebench.REVISION``); the resolved commit and SHA-256 go to ``<data>/ruler/source.json``.
ESSAY_REPO, ESSAY_REVISION, ESSAY_FILE = "opencompass/NeedleBench", "main", "PaulGrahamEssays.jsonl"


# ----------------------------------------------------------------------------------------------- data files


def prepare(dest: Path, names: list[str] | None = None) -> list[Path]:
    """Download the essay haystack and the qa_1 / qa_2 source files into ``dest`` (``names``: essay, squad,
    hotpotqa)."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = names or ["essay", *QA_FILES]
    files = []
    if "essay" in wanted:
        files += fetch_hub_files(ESSAY_REPO, ESSAY_REVISION, [ESSAY_FILE], dest, BENCHMARK)
    for name in wanted:
        if name in QA_FILES:
            fname, url = QA_FILES[name]
            files.append(download(url, dest / fname, root=dest))
    return files


def _require(path: Path, what: str, name: str) -> Path:
    if not path.exists():
        raise DataMissingError(missing_message(BENCHMARK, what, path, [name]))
    return path


@cache
def load_essay(data_dir: str) -> str:
    """The essay haystack: RULER's ``PaulGrahamEssays.json`` (``{"text": ...}``) or NeedleBench's JSONL copy."""
    root = Path(data_dir)
    if (root / "PaulGrahamEssays.json").exists():
        return json.loads((root / "PaulGrahamEssays.json").read_text())["text"]
    path = _require(root / ESSAY_FILE, "RULER essay haystack (Paul Graham essays)", "essay")
    return " ".join(json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip())


@cache
def read_squad(path: str) -> tuple[list[dict], list[str]]:
    """RULER's ``read_squad``: answerable questions, the sorted unique paragraphs as documents."""
    data = json.loads(Path(path).read_text())
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        more = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for qa in p["qas"]:
                if not qa["is_impossible"]:
                    gold = index[p["context"]]
                    qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                "context": [gold], "more_context": [i for i in more if i != gold]})
    return qas, docs


@cache
def read_hotpotqa(path: str) -> tuple[list[dict], list[str]]:
    """RULER's ``read_hotpotqa``: every question with its (gold + distractor) paragraphs as ``title\\ntext``."""
    data = json.loads(Path(path).read_text())
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    return qas, docs


@cache
def wonder_words() -> tuple[list[str], list[str], list[str]]:
    """wonderwords' noun, adjective and verb lists (RULER's key words and common words)."""
    from wonderwords import random_word

    return tuple(random_word._get_words_from_text_file(f"{k}list.txt") for k in ("noun", "adjective", "verb"))


@cache
def _sentence_splitter() -> tuple[Callable[[str], list[str]], str]:
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    try:
        nltk.sent_tokenize("A. B.")
        return nltk.sent_tokenize, "nltk-punkt"
    except LookupError:
        return PunktSentenceTokenizer().tokenize, "punkt-untrained"


# ----------------------------------------------------------------------------------------------- generators


@dataclass
class Built:
    """One generated input: the text around the haystack, the question, the answer prefix and the gold."""

    context: str
    question: str
    answer_prefix: str
    outputs: list[str]
    meta: dict[str, Any]

    @property
    def text(self) -> str:
        return self.context + self.question + self.answer_prefix


def _split_template(template: str, answer_prefix: str, context: str, **fields: Any) -> tuple[str, str, str]:
    """(prompt up to and including the haystack, the rest of the template, the answer prefix)."""
    marker = "\x00CONTEXT\x00"
    head, tail = template.format(context=marker, **fields).split(marker)
    return head + context, tail, answer_prefix.format(**fields)


class Generator:
    """RULER's generator for one task; ``build(n, rng)`` makes an input with ``n`` haystack units."""

    def __init__(self, name: str, tokenizer: Any, seed: int, data_dir: str, essay: str) -> None:
        self.name, self.tok, self.seed, self.data_dir = name, tokenizer, seed, data_dir
        self.args = {"num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1, **TASKS[name]}
        self.kind = self.args["task"]
        self.tokens_to_generate = TEMPLATES[self.kind]["tokens_to_generate"]
        self.meta: dict[str, Any] = {}
        if self.args.get("type_haystack") == "essay":
            text = load_essay(data_dir) if essay == "file" else _synthetic_essay(seed)
            self.essay_words = re.sub(r"\s+", " ", text).split(" ")
            self.split_sentences, self.meta["sentence_splitter"] = _sentence_splitter()
            self.meta["essay"] = essay
        if self.kind == "qa":
            fname = QA_FILES[self.args["dataset"]][0]
            path = _require(Path(data_dir) / fname, f"RULER {name} source ({fname})", self.args["dataset"])
            reader = read_squad if self.args["dataset"] == "squad" else read_hotpotqa
            self.qas, self.docs = reader(str(path))

    def incremental(self, max_length: int) -> int:
        """RULER's ``incremental``: the search's lower bound and the per-sample shrink step (in haystack units)."""
        haystack = self.args.get("type_haystack")
        if self.kind in ("niah", "variable_tracking"):
            if haystack != "essay" and max_length < 4096:
                return 5
            return 500 if haystack == "essay" else (25 if self.kind == "niah" else 10)
        if self.kind == "freq_words_extraction":
            return max(1, (max_length - self.tokens_to_generate) // 32)
        return 10  # cwe, qa

    def n_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    # --- niah ---------------------------------------------------------------------------------------------

    def _random(self, rng: random.Random, kind: str) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        nouns, adjs, _ = wonder_words()
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"

    def niah(self, n: int, rng: random.Random, max_length: int) -> Built:
        a = self.args
        keys, values, needles = [], [], []
        for _ in range(max(a["num_needle_k"], a["num_needle_q"])):
            keys.append(self._random(rng, a["type_needle_k"]))
            values.append([self._random(rng, a["type_needle_v"]) for _ in range(a["num_needle_v"])])
            needles += [NEEDLE.format(type_needle_v=a["type_needle_v"], key=keys[-1], value=v) for v in values[-1]]
        random.Random(self.seed).shuffle(needles)
        if a["type_haystack"] == "essay":
            words = (self.essay_words * (n // len(self.essay_words) + 1))[:n]
            sents = self.split_sentences(" ".join(words).strip())
            cuts = [0, *sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))), len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if a["type_haystack"] == "noise":
                sentences = [NOISE] * n
            else:
                sentences = [NEEDLE.format(type_needle_v=a["type_needle_v"], key=self._random(rng, a["type_needle_k"]),
                                           value=self._random(rng, a["type_needle_v"])) for _ in range(n)]
            for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles, strict=True):
                sentences.insert(index, needle)
            context = "\n".join(sentences)
        asked = rng.sample(range(len(keys)), a["num_needle_q"])
        queries = [keys[i] for i in asked]
        outputs = [v for i in asked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix = TEMPLATES["niah"]["template"], TEMPLATES["niah"]["answer_prefix"]
        type_v = a["type_needle_v"]
        if a["num_needle_q"] * a["num_needle_v"] == 1:  # RULER edits the whole template (and prefix) verbatim
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                template, prefix = template.replace(old, new), prefix.replace(old, new)
            type_v = type_v[:-1]
        head, tail, pre = _split_template(template, prefix, context, type_needle_v=type_v, query=query)
        return Built(head, tail, pre, outputs, {})

    # --- variable tracking --------------------------------------------------------------------------------

    def _chains(self, rng: random.Random, is_icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        a = self.args
        k, hops = (3, min(10, a["num_hops"])) if is_icl else (5, a["num_hops"])
        total = (hops + 1) * a["num_chains"]
        names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range(total)]
        while len(set(names)) < total:
            names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
        names_out, chains = [], []
        for i in range(0, len(names), hops + 1):
            var = names[i : i + hops + 1]
            names_out.append(var)
            chain = [f"VAR {var[0]} = {12345 if is_icl else rng.randint(10000, 99999)}"]
            chain += [f"VAR {var[j + 1]} = VAR {var[j]} " for j in range(hops)]
            chains.append(chain)
        return names_out, chains

    def _vt_text(self, n: int, rng: random.Random, is_icl: bool) -> tuple[str, list[str], str]:
        names, chains = self._chains(rng, is_icl)
        value = chains[0][0].split("=")[-1].strip()
        sentences = [NOISE] * n
        for chain in chains:
            positions = sorted(rng.sample(range(len(sentences)), len(chain)))
            for j, pos in enumerate(positions):
                sentences.insert(pos + j, chain[j])
        context = "\n".join(sentences).replace(". \n", ".\n")
        return context, names[0], value

    def icl_example(self, rng: random.Random) -> str:
        """RULER's in-context example: a vt prompt of <= 500 tokens with its answer, randomised per sample."""
        if not hasattr(self, "_icl"):
            icl_rng = random.Random(f"ruler/{self.seed}/vt-icl")
            t = TEMPLATES["variable_tracking"]

            def text(n: int) -> tuple[str, list[str]]:
                ctx, out, value = self._vt_text(n, icl_rng, is_icl=True)
                num_v = self.args["num_hops"] + 1
                return (t["template"].format(context=ctx, query=value)
                        + t["answer_prefix"].format(num_v=num_v, query=value)), out

            n = _fit(lambda m: self.n_tokens(text(m)[0]), 500, 5)
            prompt, outputs = text(n)
            self._icl = prompt + " " + " ".join(outputs) + "\n"
        example = self._icl
        for item in example.strip().split()[-self.args["num_hops"] - 1 :]:
            example = example.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
        return example.replace("12345", str(rng.randint(10000, 99999)))

    def variable_tracking(self, n: int, rng: random.Random, max_length: int) -> Built:
        context, outputs, value = self._vt_text(n, rng, is_icl=False)
        t = TEMPLATES["variable_tracking"]
        head, tail, pre = _split_template(t["template"], t["answer_prefix"], context, query=value,
                                          num_v=self.args["num_hops"] + 1)
        return Built(self.icl_example(rng) + "\n" + head, tail, pre, outputs, {})

    # --- common / frequent words --------------------------------------------------------------------------

    @property
    def cwe_words(self) -> list[str]:
        if not hasattr(self, "_cwe_words"):
            nouns, adjs, verbs = wonder_words()
            self._cwe_words = sorted(set(nouns + adjs + verbs))
            random.Random(self.seed).shuffle(self._cwe_words)
        return self._cwe_words

    def _cwe_example(self, rng: random.Random, n: int, common: int, uncommon: int) -> tuple[str, list[str]]:
        if n > len(self.cwe_words):
            raise UsageError(f"RULER cwe needs {n} distinct words here; kvbench has {len(self.cwe_words)} (RULER's "
                             "english_words.json for the longest lengths is not shipped)")
        words = rng.sample(self.cwe_words, n)
        cw, ucw = words[: self.args["num_cw"]], words[self.args["num_cw"] :]
        listed = cw * common + ucw * uncommon
        random.Random(self.seed).shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), cw

    def common_words_extraction(self, n: int, rng: random.Random, max_length: int) -> Built:
        t, a = TEMPLATES["common_words_extraction"], self.args
        small = max_length < 4096
        shot_ctx, shot_ans = self._cwe_example(rng, 20, 3, 1) if small else self._cwe_example(rng, 40, 10, 3)
        context, answer = (self._cwe_example(rng, n, 6, 1) if small
                           else self._cwe_example(rng, n, a["freq_cw"], a["freq_ucw"]))
        shot = (t["template"].format(context=shot_ctx) + t["answer_prefix"] + " "
                + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_ans)))
        head, tail, pre = _split_template(t["template"], t["answer_prefix"], context)
        return Built(shot + "\n" + head, tail, pre, answer, {})

    def freq_words_extraction(self, n: int, rng: random.Random, max_length: int) -> Built:
        t, alpha = TEMPLATES["freq_words_extraction"], self.args["alpha"]
        vocab_size = (max_length - self.tokens_to_generate) // 50
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(vocab_size)]
        while len(set(vocab)) < vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=6)))
        vocab = sorted(set(vocab))
        random.Random(self.seed).shuffle(vocab)
        vocab[0] = "..."  # the top-ranked word is noise
        z = zeta(alpha)
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k**-alpha / z))]
        random.Random(self.seed).shuffle(words)
        head, tail, pre = _split_template(t["template"], t["answer_prefix"], " ".join(words))
        return Built(head, tail, pre, vocab[1:4], {})

    # --- qa -----------------------------------------------------------------------------------------------

    def qa(self, n: int, rng: random.Random, max_length: int, index: int = 0) -> Built:
        item = self.qas[index % len(self.qas)]
        gold, more = item["context"], item.get("more_context", [])
        if n < len(self.docs):
            if n - len(gold) > len(more):
                others = [i for i in range(len(self.docs)) if i not in gold + more]
                chosen = gold + more + rng.sample(others, max(0, n - len(gold) - len(more)))
            else:
                chosen = gold + rng.sample(more, n - len(gold))
            docs = [self.docs[i] for i in chosen]
        else:
            docs = (self.docs * (n // len(self.docs) + 1))[:n]
        random.Random(self.seed).shuffle(docs)
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(docs))
        t = TEMPLATES["qa"]
        head, tail, pre = _split_template(t["template"], t["answer_prefix"], context, query=item["query"])
        return Built(head, tail, pre, item["outputs"], {"qa_index": index % len(self.qas)})

    def build(self, n: int, rng: random.Random, max_length: int, index: int = 0) -> Built:
        if self.kind == "qa":
            return self.qa(n, rng, max_length, index)
        return getattr(self, self.kind)(n, rng, max_length)


def zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann zeta(alpha), alpha > 1 (scipy's ``zeta`` in RULER): partial sum + Euler-Maclaurin tail."""
    n = terms
    head = sum(k**-alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12


@cache
def _synthetic_essay(seed: int) -> str:
    """Offline stand-in for the essays: the embedded suite's filler sentences (not RULER's haystack)."""
    rng = random.Random(f"ruler-synthetic-essay/{seed}")
    return " ".join(" ".join(s) for s in synthetic._filler(rng, 40_000))


def _fit(total: Callable[[int], int], limit: int, lo: int) -> int:
    """Largest n >= lo with ``total(n) <= limit`` (exponential, then binary search); lo if none fits."""
    hi = lo
    while total(hi) <= limit:
        lo, hi = hi, hi * 2
    best = lo if total(lo) <= limit else None
    lo_b, hi_b = lo + 1, hi - 1
    while lo_b <= hi_b:
        mid = (lo_b + hi_b) // 2
        if total(mid) <= limit:
            best, lo_b = mid, mid + 1
        else:
            hi_b = mid - 1
    return best if best is not None else lo


# ----------------------------------------------------------------------------------------------- loader


def make_samples(task: str, tokenizer: Any, lengths: list[int], n_samples: int = 500, seed: int = DEFAULT_SEED,
                 data_dir: str = "data/ruler", essay: str = "file", limit: int | None = None) -> list[Sample]:
    """RULER samples of ``task`` at each length (``max_seq_length``: input + answer prefix + tokens to generate).

    Args:
        task: one of :data:`TASKS` (niah_single_1 ... qa_2).
        tokenizer: the evaluated model's tokenizer (given by the runner).
        lengths: RULER's ``max_seq_length`` values, e.g. [4096, 8192, 16384].
        n_samples: samples per length (RULER's default 500).
        seed: RULER's ``random_seed`` (42).
        data_dir: the essay / SQuAD / HotpotQA files (``scripts/prepare_data.py ruler``).
        essay: ``file`` (Paul Graham essays) or ``synthetic`` (offline filler sentences, not comparable).
        limit: generate only the first ``limit`` samples (the run's ``limit``).
    """
    if task not in TASKS:
        raise UsageError(f"unknown RULER task {task!r}; choose one of {', '.join(TASKS)}")
    if essay not in ("file", "synthetic"):
        raise UsageError(f"essay={essay!r}; choose file or synthetic")
    gen = Generator(task, tokenizer, seed, data_dir, essay)
    samples: list[Sample] = []
    for length in lengths:
        if limit is not None and len(samples) >= limit:
            break
        budget = length - gen.tokens_to_generate
        probe = random.Random(f"ruler/{seed}/{task}/{length}/size")
        step = gen.incremental(length)
        size = lambda n, r=probe, L=length: gen.n_tokens(gen.build(n, r, L).text)  # noqa: E731
        if gen.kind == "freq_words_extraction":  # RULER's linear search from max_len // 6 words, one step back
            n_fit = budget // 6
            while size(n_fit) < budget:
                n_fit += step
            n_fit -= step
        else:
            n_fit = _fit(size, budget, step)
        for i in range(n_samples):
            if limit is not None and len(samples) >= limit:
                return samples
            rng = random.Random(f"ruler/{seed}/{task}/{length}/{i}")
            n = n_fit
            built = gen.build(n, rng, length, i)
            while gen.n_tokens(built.text) > budget and n > step:  # RULER's per-sample shrink loop
                n -= step
                built = gen.build(n, random.Random(f"ruler/{seed}/{task}/{length}/{i}"), length, i)
            total = gen.n_tokens(built.text) + gen.tokens_to_generate
            meta = {"task": task, "target_length": length, "length": total, "haystack_units": n, "index": i,
                    **gen.meta, **built.meta}
            if gen.kind == "niah":
                meta["token_position_answer"] = gen.n_tokens(built.context[: built.context.find(built.outputs[0])])
            q = Question(id="q0", text=built.question, answers=built.outputs, answer_prefix=built.answer_prefix)
            samples.append(Sample(id=f"{task}-L{length}-{i}", context=built.context, questions=[q], meta=meta))
    return samples
