"""Write the embedded English–German pairs of recipes/translate.py (``--dataset default``).

The sentences are generated here from small hand-written lexicons and templates (subject–verb–
object with articles, adjectives, colors, numbers and places; German articles, adjective
endings and verb forms agree in gender, number and case). Nothing is taken from Multi30k or
any other corpus. Deterministic: running it again writes the same files::

    python recipes/data/make_en_de.py      # -> recipes/data/en_de/{train,validation,test}.jsonl

Each line is ``{"en": ..., "de": ...}``, the schema of ``bentrevett/multi30k`` on the Hub.
The three splits share no English sentence; every test word also occurs in training.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

SIZES = {"train": 800, "validation": 100, "test": 100}
SEED = 2020
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "en_de")


@dataclass(frozen=True)
class Noun:
    en: str
    en_pl: str | None  # None: not used in the plural
    de: str
    de_pl: str | None
    gender: str  # m, f, n
    kind: str  # person, animal, thing, food


NOUNS = [
    Noun("man", "men", "Mann", "Männer", "m", "person"),
    Noun("woman", "women", "Frau", "Frauen", "f", "person"),
    Noun("child", "children", "Kind", "Kinder", "n", "person"),
    Noun("girl", "girls", "Mädchen", "Mädchen", "n", "person"),
    Noun("teacher", "teachers", "Lehrer", "Lehrer", "m", "person"),
    Noun("doctor", "doctors", "Arzt", "Ärzte", "m", "person"),
    Noun("dog", "dogs", "Hund", "Hunde", "m", "animal"),
    Noun("cat", "cats", "Katze", "Katzen", "f", "animal"),
    Noun("bird", "birds", "Vogel", "Vögel", "m", "animal"),
    Noun("horse", "horses", "Pferd", "Pferde", "n", "animal"),
    Noun("ball", "balls", "Ball", "Bälle", "m", "thing"),
    Noun("book", "books", "Buch", "Bücher", "n", "thing"),
    Noun("car", "cars", "Auto", "Autos", "n", "thing"),
    Noun("hat", "hats", "Hut", "Hüte", "m", "thing"),
    Noun("cup", "cups", "Tasse", "Tassen", "f", "thing"),
    Noun("flower", "flowers", "Blume", "Blumen", "f", "thing"),
    Noun("bag", "bags", "Tasche", "Taschen", "f", "thing"),
    Noun("bike", "bikes", "Fahrrad", "Fahrräder", "n", "thing"),
    Noun("letter", "letters", "Brief", "Briefe", "m", "thing"),
    Noun("box", "boxes", "Kiste", "Kisten", "f", "thing"),
    Noun("apple", "apples", "Apfel", "Äpfel", "m", "food"),
    Noun("cake", "cakes", "Kuchen", "Kuchen", "m", "food"),
    Noun("bread", None, "Brot", None, "n", "food"),
]
NAMES = ["Anna", "Tom", "Lisa", "Max", "Paul", "Emma"]

# (en, de stem, the kinds of noun it may describe)
ALIVE, OBJECT, NOT_PERSON = ("person", "animal"), ("thing", "food"), ("animal", "thing", "food")
ADJECTIVES = [
    ("big", "groß", ALIVE + OBJECT), ("small", "klein", ALIVE + OBJECT),
    ("old", "alt", ALIVE + OBJECT), ("young", "jung", ALIVE), ("new", "neu", OBJECT),
    ("happy", "glücklich", ALIVE), ("tired", "müde", ALIVE), ("red", "rot", OBJECT),
    ("blue", "blau", OBJECT), ("green", "grün", OBJECT), ("yellow", "gelb", OBJECT),
    ("black", "schwarz", NOT_PERSON), ("white", "weiß", NOT_PERSON),
    ("brown", "braun", NOT_PERSON),
]  # fmt: skip
PREDICATIVE = ["big", "small", "old", "young", "happy", "tired"]
NUMBERS = [("two", "zwei"), ("three", "drei"), ("four", "vier"), ("five", "fünf")]


@dataclass(frozen=True)
class Verb:
    en: str
    en_pl: str
    de: str
    de_pl: str
    subjects: tuple[str, ...]  # noun kinds that may be the subject
    objects: tuple[str, ...] = ()  # noun kinds it takes as object (empty: intransitive)


ANY = ("person", "animal", "thing", "food")
HANDHELD = ("ball", "book", "hat", "cup", "flower", "bag", "letter", "food")
TRANSITIVE = [
    Verb("sees", "see", "sieht", "sehen", ("person", "animal"), ANY),
    Verb("finds", "find", "findet", "finden", ("person", "animal"), ANY),
    Verb("likes", "like", "mag", "mögen", ("person", "animal"), ANY),
    Verb("paints", "paint", "malt", "malen", ("person",), ANY),
    Verb("holds", "hold", "hält", "halten", ("person",), HANDHELD),
    Verb("carries", "carry", "trägt", "tragen", ("person", "animal"), ("thing", "food")),
    Verb("buys", "buy", "kauft", "kaufen", ("person",), ("thing", "food")),
    Verb("eats", "eat", "isst", "essen", ("person", "animal"), ("food",)),
    Verb("reads", "read", "liest", "lesen", ("person",), ("book", "letter")),
    Verb("throws", "throw", "wirft", "werfen", ("person",), ("ball", "apple", "hat", "flower")),
]
INTRANSITIVE = [
    Verb("runs", "run", "läuft", "laufen", ("person", "animal")),
    Verb("sleeps", "sleep", "schläft", "schlafen", ("person", "animal")),
    Verb("plays", "play", "spielt", "spielen", ("person", "animal")),
    Verb("sits", "sit", "sitzt", "sitzen", ("person", "animal")),
    Verb("waits", "wait", "wartet", "warten", ("person", "animal")),
    Verb("stands", "stand", "steht", "stehen", ("person", "animal")),
    Verb("sings", "sing", "singt", "singen", ("person", "animal")),
    Verb("dances", "dance", "tanzt", "tanzen", ("person",)),
]
PLACES = [
    ("in the park", "im Park"), ("in the garden", "im Garten"),
    ("in the kitchen", "in der Küche"), ("on the street", "auf der Straße"),
    ("at the beach", "am Strand"), ("by the lake", "am See"), ("in the city", "in der Stadt"),
    ("in the house", "im Haus"), ("in the snow", "im Schnee"), ("on the grass", "auf dem Gras"),
    ("at school", "in der Schule"), ("at the station", "am Bahnhof"),
]  # fmt: skip

# German articles and adjective endings by (article, case, gender or "pl")
DEFINITE = {"nom": {"m": "der", "f": "die", "n": "das", "pl": "die"},
            "acc": {"m": "den", "f": "die", "n": "das", "pl": "die"}}  # fmt: skip
INDEFINITE = {"nom": {"m": "ein", "f": "eine", "n": "ein"},
              "acc": {"m": "einen", "f": "eine", "n": "ein"}}  # fmt: skip
WEAK = {"nom": {"m": "e", "f": "e", "n": "e", "pl": "en"},  # after der/die/das
        "acc": {"m": "en", "f": "e", "n": "e", "pl": "en"}}  # fmt: skip
MIXED = {"nom": {"m": "er", "f": "e", "n": "es"},  # after ein/eine
         "acc": {"m": "en", "f": "e", "n": "es"}}  # fmt: skip
STRONG_PLURAL = "e"  # no article: zwei kleine Hunde (nominative and accusative)


def inflect(stem: str, ending: str) -> str:
    """groß + en -> großen; müde + en -> müden (a stem in -e drops the ending's e)."""
    return stem + (ending[1:] if stem.endswith("e") and ending.startswith("e") else ending)


def fits(adjective: tuple[str, str, tuple[str, ...]], noun: Noun) -> bool:
    return noun.kind in adjective[2]


def a_or_an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class Generator:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def adjective(self, noun: Noun, p: float = 0.5):
        if self.rng.random() >= p:
            return None
        return self.rng.choice([a for a in ADJECTIVES if fits(a, noun)])

    def noun_phrase(self, noun: Noun, case: str, allow_plural: bool = True, allow_name=False,
                    adjective_p: float = 0.5):
        """(English, German, plural?) for a phrase built on ``noun`` in ``case``."""
        rng = self.rng
        if allow_name and rng.random() < 0.15:
            name = rng.choice(NAMES)
            return name, name, False
        adj = self.adjective(noun, adjective_p)
        form = rng.choice(["the", "a", "the", "number", "the_pl"] if allow_plural and noun.en_pl
                          else ["the", "a"])  # fmt: skip
        en_adj = f"{adj[0]} " if adj else ""
        if form == "the":
            de_adj = f"{inflect(adj[1], WEAK[case][noun.gender])} " if adj else ""
            de = f"{DEFINITE[case][noun.gender]} {de_adj}{noun.de}"
            return f"the {en_adj}{noun.en}", de, False
        if form == "a":
            de_adj = f"{inflect(adj[1], MIXED[case][noun.gender])} " if adj else ""
            en = f"{en_adj}{noun.en}"
            de = f"{INDEFINITE[case][noun.gender]} {de_adj}{noun.de}"
            return f"{a_or_an(en)} {en}", de, False
        if form == "the_pl":
            de_adj = f"{inflect(adj[1], WEAK[case]['pl'])} " if adj else ""
            return f"the {en_adj}{noun.en_pl}", f"die {de_adj}{noun.de_pl}", True
        number = rng.choice(NUMBERS)
        de_adj = f"{inflect(adj[1], STRONG_PLURAL)} " if adj else ""
        return f"{number[0]} {en_adj}{noun.en_pl}", f"{number[1]} {de_adj}{noun.de_pl}", True

    def subject(self, verb: Verb):
        noun = self.rng.choice([n for n in NOUNS if n.kind in verb.subjects])
        return self.noun_phrase(noun, "nom", allow_name=noun.kind == "person")

    def object(self, verb: Verb):
        nouns = [n for n in NOUNS if n.kind in verb.objects or n.en in verb.objects]
        noun = self.rng.choice(nouns)
        return self.noun_phrase(noun, "acc", allow_name=noun.kind == "person")

    def clause(self, intransitive: bool | None = None):
        rng = self.rng
        if intransitive is None:
            intransitive = rng.random() < 0.4
        verb = rng.choice(INTRANSITIVE if intransitive else TRANSITIVE)
        en_s, de_s, plural = self.subject(verb)
        en_v, de_v = (verb.en_pl, verb.de_pl) if plural else (verb.en, verb.de)
        en, de = [en_s, en_v], [de_s, de_v]
        if not intransitive:
            en_o, de_o, _ = self.object(verb)
            en.append(en_o)
            de.append(de_o)
        return en, de

    def sentence(self) -> tuple[str, str]:
        rng = self.rng
        template = rng.choices(["svo", "place", "today", "predicate", "and"],
                               weights=[4, 4, 1.5, 1.5, 1.5])[0]  # fmt: skip
        if template == "predicate":  # the dog is tired (in the garden)
            noun = rng.choice([n for n in NOUNS if n.kind in ("person", "animal")])
            word = rng.choice(PREDICATIVE)
            adjective = next(a for a in ADJECTIVES if a[0] == word)
            en_s, de_s, plural = self.noun_phrase(noun, "nom", allow_name=noun.kind == "person",
                                                  adjective_p=0.0)
            en = [en_s, "are" if plural else "is", adjective[0]]
            de = [de_s, "sind" if plural else "ist", adjective[1]]
            if word in ("happy", "tired") and rng.random() < 0.6:
                place = rng.choice(PLACES)
                en.append(place[0])
                de.append(place[1])
        elif template == "and":  # two clauses
            en, de = self.clause()
            en2, de2 = self.clause()
            en += ["and", *en2]
            de += ["und", *de2]
        else:
            en, de = self.clause(intransitive=None if template != "svo" else False)
            if template in ("place", "today"):
                place = rng.choice(PLACES)
                en.append(place[0])
                de.append(place[1])
            if template == "today":  # German: the time adverb right after the verb
                en.append("today")
                de.insert(2, "heute")
        return _sentence_case(" ".join(en)), _sentence_case(" ".join(de))


def _sentence_case(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def generate(sizes: dict[str, int] = SIZES, seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    gen = Generator(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split in ("test", "validation", "train"):  # held-out splits first
        rows: list[dict[str, str]] = []
        while len(rows) < sizes[split]:
            en, de = gen.sentence()
            if en not in seen:
                seen.add(en)
                rows.append({"en": en, "de": de})
        splits[split] = rows
    def words(row):
        return set((row["en"] + " " + row["de"]).lower().replace(".", "").split())

    train_words = set().union(*map(words, splits["train"]))
    for split in ("test", "validation"):  # keep held-out sentences whose words were all seen
        for row in splits[split]:
            missing = words(row) - train_words
            if missing:
                raise AssertionError(f"{split} uses words never seen in training: {missing}")
    return splits


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for split, rows in generate().items():
        with open(os.path.join(OUT, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"{split}: {len(rows)} pairs -> {os.path.join(OUT, split + '.jsonl')}")


if __name__ == "__main__":
    main()
