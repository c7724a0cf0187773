"""Prompt parsing for the scorers: spaCy ``en_core_web_sm`` (official) or a rule parser.

The official scripts use spaCy 3.5 with ``en_core_web_sm`` 3.5.0 for: noun chunks (B-VQA
questions), NOUN/PROPN tokens (the 2D/3D objects), ADJ tokens (CLIP ``--complex``) and the
tokenisation (numeracy). :class:`SpacyParser` calls exactly those. When spaCy or its English model
is not installed, :class:`RuleParser` stands in and every score computed with it is marked
``official: false``.

The rule parser (documented approximation, no statistics):

- tokens: words (letters, digits, inner apostrophes/hyphens) and single punctuation marks, the way
  spaCy splits these prompts ("cat." → "cat", ".");
- ADJ: words in a lexicon of colours, shapes, textures/materials, sizes and common descriptive
  adjectives, and words longer than 5 letters ending in -ful, -ous, -ish or -less;
- function words (determiners, numbers, pronouns, prepositions, conjunctions, auxiliaries),
  relation words (left, right, top, bottom, side, front) and words ending in -ing or -ed (verbs in
  these prompts) are not nouns; every other alphabetic word is a NOUN;
- noun chunks: a maximal run of [determiner/number] ADJ* (and/"," ADJ)* NOUN+ ending at a noun,
  which covers "a ADJ NOUN and a ADJ NOUN", the template of most attribute prompts.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")

_DET = {"a", "an", "the", "this", "that", "these", "those", "some", "its", "his", "her", "their", "my", "your",
        "our", "each", "every", "another", "any", "no", "several", "many", "few", "both"}
_NUM = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"}
_PRON = {"it", "they", "he", "she", "them", "him", "we", "i", "you", "itself", "who", "which", "what", "there"}
_PREP = {"on", "of", "in", "at", "to", "with", "by", "near", "behind", "under", "above", "below", "from", "into",
         "onto", "over", "beside", "besides", "next", "for", "against", "through", "across", "around", "between",
         "among", "inside", "outside", "beneath", "underneath", "atop", "up", "down", "off", "out", "as", "like",
         "while", "during", "toward", "towards", "along", "upon", "within", "without", "hidden"}
_CONJ = {"and", "or", "but", "nor", "so", "yet", "then", "than"}
_AUX = {"is", "are", "was", "were", "be", "been", "being", "am", "has", "have", "had", "do", "does", "did", "can",
        "could", "will", "would", "should", "may", "might", "must", "not"}
_RELATION = {"left", "right", "top", "bottom", "side", "front", "back", "middle", "center", "centre"}
_ADJ = set("""
red orange yellow green blue purple pink brown black white gray grey gold golden silver beige maroon violet
cyan magenta turquoise teal navy ivory tan crimson scarlet bronze copper colorful colourful multicolored dark light
pale bright
round square triangular rectangular circular oval cylindrical spherical cubic cubical conical hexagonal
pentagonal octagonal diamond heart-shaped star-shaped oblong curved flat pointed tall short long big small large
tiny huge giant little wide narrow thick thin
wooden metallic plastic glass leather fluffy furry fuzzy rubber fabric metal stone ceramic woolen wool silk
velvet cotton denim paper rough smooth soft hard shiny glossy matte transparent translucent sparkly striped
spotted checkered plaid knitted woven concrete marble brick granite porcelain crystal iron steel copper
different various high low necessary
old new young modern ancient vintage antique beautiful cute pretty ugly happy sad angry hungry wet dry hot
cold warm cool clean dirty empty full open closed fresh rotten ripe heavy fancy simple elegant delicious
""".split())
_ADJ_SUFFIX = ("ful", "ous", "ish", "less")


def tokenize(text: str) -> List[str]:
    """Words and punctuation marks, as spaCy splits T2I-CompBench prompts."""
    return _TOKEN.findall(text)


def rule_pos(tokens: Sequence[str]) -> List[str]:
    """A coarse Universal-POS tag per token (NOUN, ADJ, DET, NUM, ADP, CCONJ, AUX, PRON, VERB,
    PUNCT, X) by the rules in the module docstring."""
    tags = []
    for t in tokens:
        w = t.lower()
        if not any(ch.isalnum() for ch in w):
            tags.append("PUNCT")
        elif w in _DET:
            tags.append("DET")
        elif w in _NUM or w.isdigit():
            tags.append("NUM")
        elif w in _PRON:
            tags.append("PRON")
        elif w in _PREP or w in _RELATION:
            tags.append("ADP")
        elif w in _CONJ:
            tags.append("CCONJ")
        elif w in _AUX:
            tags.append("AUX")
        elif w in _ADJ or (w.endswith(_ADJ_SUFFIX) and len(w) > 5):
            tags.append("ADJ")
        elif (w.endswith("ing") and len(w) > 4) or (w.endswith("ed") and len(w) > 4):
            tags.append("VERB")
        else:
            tags.append("NOUN")
    return tags


class Parser:
    """Interface of the scorers' prompt analysis. ``official`` says whether it is the official
    spaCy pipeline."""
    name = "abstract"
    official = False

    def tokens(self, text: str) -> List[Tuple[str, str]]:
        """(text, POS) per token."""
        raise NotImplementedError

    def noun_chunks(self, text: str) -> List[str]:
        raise NotImplementedError

    def words(self, text: str) -> List[str]:
        return [t for t, _ in self.tokens(text)]


class RuleParser(Parser):
    """The documented rule parser (``official: false``)."""
    name = "rules"
    official = False

    def tokens(self, text: str) -> List[Tuple[str, str]]:
        toks = tokenize(text)
        return list(zip(toks, rule_pos(toks)))

    def noun_chunks(self, text: str) -> List[str]:
        toks = self.tokens(text)
        chunks: List[str] = []
        i, n = 0, len(toks)
        while i < n:
            t, pos = toks[i]
            if pos not in ("DET", "NUM", "ADJ", "NOUN"):
                i += 1
                continue
            j = i
            last_noun = None
            while j < n:
                tj, pj = toks[j]
                if pj == "NOUN":
                    last_noun = j
                elif pj in ("DET", "NUM"):
                    if j != i:
                        break
                elif pj == "ADJ":
                    if last_noun is not None:
                        break
                elif pj in ("CCONJ", "PUNCT") and tj.lower() in ("and", ",") and last_noun is None \
                        and j + 1 < n and toks[j + 1][1] == "ADJ":
                    pass  # "a black and white cat"
                else:
                    break
                j += 1
            if last_noun is not None:
                chunks.append(_join(toks[i:last_noun + 1]))
                i = last_noun + 1
            else:
                i = j if j > i else i + 1
        return chunks


def _join(toks: Sequence[Tuple[str, str]]) -> str:
    out = ""
    for t, pos in toks:
        out += t if (pos == "PUNCT" or not out) else " " + t
    return out


class SpacyParser(Parser):
    """spaCy with ``en_core_web_sm``: the official analysis (version recorded in score.json)."""
    name = "spacy"
    official = True

    def __init__(self, model: str = "en_core_web_sm"):
        import spacy

        self.nlp = spacy.load(model)
        self.version = f"spacy {spacy.__version__}, {model} {self.nlp.meta.get('version')}"
        self._cache = {}

    def _doc(self, text: str):
        d = self._cache.get(text)
        if d is None:
            d = self._cache[text] = self.nlp(text)
        return d

    def tokens(self, text: str) -> List[Tuple[str, str]]:
        return [(t.text, t.pos_) for t in self._doc(text)]

    def noun_chunks(self, text: str) -> List[str]:
        return [c.text for c in self._doc(text).noun_chunks]


def get_parser(kind: str = "auto") -> Parser:
    """"spacy" (raises ValueError when spaCy or en_core_web_sm is missing), "rules", or "auto"
    (spaCy when it loads, else the rule parser)."""
    if kind not in ("auto", "spacy", "rules"):
        raise ValueError(f"taca eval: argument --parser: {kind!r} is not one of auto, spacy, rules")
    if kind == "rules":
        return RuleParser()
    try:
        return SpacyParser()
    except (ImportError, OSError) as e:
        if kind == "spacy":
            raise ValueError(
                "taca eval: argument --parser spacy: spaCy's English model is not available "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Install it with "
                "`pip install spacy==3.5.3` and `pip install https://github.com/explosion/spacy-models/releases/"
                "download/en_core_web_sm-3.5.0/en_core_web_sm-3.5.0-py3-none-any.whl` (the versions the official "
                "scripts pin), or use --parser rules (scores then marked official: false)") from None
        return RuleParser()


# The analyses the scorers need ----------------------------------------------------------------
BLIP_SKIP_CHUNKS = ("top", "the side", "the left", "the right")


def blip_questions(parser: Parser, prompt: str) -> List[str]:
    """Noun chunks of the prompt without 'top'/'the side'/'the left'/'the right', each + '?'
    (BLIP_vqa.py's ``Create_annotation_for_BLIP``)."""
    return [f"{c}?" for c in parser.noun_chunks(prompt) if c not in BLIP_SKIP_CHUNKS]


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's ``pre_question``: lower-case, drop . ! " ( ) * # : ; ~, strip trailing spaces,
    keep at most 50 words."""
    q = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = q.split(" ")
    if len(words) > max_words:
        q = " ".join(words[:max_words])
    return q


def first_last_nouns(parser: Parser, prompt: str) -> Tuple[Optional[str], Optional[str]]:
    """(first NOUN, last NOUN) of the prompt (the 2D/3D objects); (None, None) without nouns (the
    official script raises IndexError there)."""
    nouns = [t for t, p in parser.tokens(prompt) if p == "NOUN"]
    return (nouns[0], nouns[-1]) if nouns else (None, None)


def complex_objects(parser: Parser, prompt: str) -> Tuple[Optional[str], Optional[str]]:
    """The ``--complex`` extraction of 2D_spatial_eval.py: for each position where a preposition
    of ``rules.COMPLEX_PREPOSITIONS`` starts (3-, then 2-, then 1-token match), the nearest NOUN or
    PROPN before it and the nearest NOUN after it (if no NOUN follows, a PROPN not followed by a
    PROPN). Exactly two objects → (obj1, obj2), else (None, None)."""
    from .rules import COMPLEX_PREPOSITIONS

    toks = parser.tokens(prompt)
    n = len(toks)

    def span(i, k):
        return _join_ws(toks[i:i + k])

    objects: List[str] = []
    for i in range(n):
        k = next((k for k in (3, 2, 1) if span(i, k) in COMPLEX_PREPOSITIONS), None)
        if k is None:
            continue
        for j in range(i - 1, -1, -1):
            if toks[j][1] in ("NOUN", "PROPN"):
                objects.append(toks[j][0])
                break
        flag = False
        for j in range(i + k, n):
            if toks[j][1] == "NOUN":
                objects.append(toks[j][0])
                break
            if j == n - 1:
                flag = True
        if flag:
            for j in range(i + k, n):
                if j + 1 < n and toks[j][1] == "PROPN" and toks[j + 1][1] != "PROPN":
                    objects.append(toks[j][0])
                    break
    return (objects[0], objects[1]) if len(objects) == 2 else (None, None)


def _join_ws(toks: Sequence[Tuple[str, str]]) -> str:
    # spaCy's Span.text keeps the original whitespace; for these prompts that is one space
    # between words and none before punctuation.
    return _join(toks)


def drop_adjectives(parser: Parser, prompt: str) -> str:
    """CLIP ``--complex``: the prompt's tokens without ADJ, joined by single spaces."""
    return " ".join(t for t, p in parser.tokens(prompt) if p != "ADJ")
