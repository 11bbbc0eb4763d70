"""Synthetic biographies in the style of bioS (Allen-Zhu & Li, "Physics of Language Models 3.1").

A *profile* is a unique full name and six attributes: birth date, birth city, university, major, employer and the
employer's city (each employer sits in one city, as in bioS). A *biography* states the six attributes in six
sentences, each drawn from several templates, in a shuffled order, with the full name in every sentence (bioS's
"fullname" variant: a small model does not have to resolve pronouns). Each person gets several biographies with
different templates and orders (bioS's "multi" augmentation, which is what lets knowledge stored from biographies
be extracted by questions later). A *QA pair* asks for one attribute with one fixed template per attribute::

    What is the birth city of Mara Quinn ? Answer : San Diego

Every word and punctuation mark is one token of a word-level tokenizer built from the generator's own word pools
(``build_tokenizer``), so "first token" and "exact match" of an answer are exact notions, and nothing is downloaded.

Everything is a pure function of a seed: ``make_profiles(n, seed)`` gives the same people on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

FIRST_NAMES = (
    "Aaron Abel Ada Alma Amos Anya Arlo Bea Bruno Cara Cleo Dario Dena Eli Elsa Emil Ezra Fay Felix Gia Gus Hana "
    "Hugo Ida Ines Ivan Jada Joel Juno Kai Kira Lars Lena Levi Lila Luca Mara Milo Nell Nico Nora Omar Opal Otto "
    "Paz Quinn Rafa Rhea Rosa Ruth Sami Saul Tara Teo Uma Vera Wren Yara Zane Zoe"
).split()
LAST_NAMES = (
    "Abbott Ashby Barlow Bishop Carver Castillo Dalton Drake Ellison Emery Fowler Garner Hale Harlow Ingram Irwin "
    "Jarvis Keller Lowell Marsh Mercer Nolan Osborne Pacheco Quill Ramsey Reyes Sawyer Shelton Thorne Tucker Vance "
    "Vargas Walsh Whitaker Yates Zamora Bauer Conley Dunn"
).split()
MONTHS = "January February March April May June July August September October November December".split()
BIRTH_CITIES = (
    "Boston", "Denver", "Austin", "Seattle", "Portland", "Phoenix", "Chicago", "Atlanta", "Miami", "Detroit",
    "Houston", "Dallas", "Tucson", "Omaha", "Tampa", "Orlando", "Raleigh", "Memphis", "Albany", "Richmond",
    "San Diego", "San Jose", "New Orleans", "Salt Lake City", "Kansas City", "Las Vegas", "El Paso", "Santa Fe",
)
UNIVERSITIES = (
    "Stanford University", "Harvard University", "Yale University", "Princeton University", "Cornell University",
    "Duke University", "Rice University", "Brown University", "Emory University", "Tufts University",
    "University of Chicago", "University of Michigan", "University of Texas", "University of Oregon",
    "University of Arizona", "University of Utah", "Ohio State University", "Penn State University",
)
MAJORS = (
    "Computer Science", "Biology", "Chemistry", "Physics", "Mathematics", "Economics", "History", "Philosophy",
    "Linguistics", "Psychology", "Sociology", "Music", "Architecture", "Civil Engineering",
    "Mechanical Engineering", "Political Science", "Public Health", "Art History", "Statistics", "Geology",
)
# employer -> its city (the sixth attribute is the employer's city, as in bioS)
EMPLOYERS = {
    "Northwind Labs": "Seattle", "Bluepeak Systems": "Denver", "Harbor Bank": "Boston", "Quantix": "San Jose",
    "Redwood Health": "Sacramento", "Lumen Energy": "Houston", "Atlas Freight": "Memphis", "Cobalt Media": "Atlanta",
    "Silverline Motors": "Detroit", "Orchid Foods": "Chicago", "Vertex Pharma": "Raleigh", "Pinecrest Insurance": "Omaha",
    "Sunridge Solar": "Phoenix", "Granite Steel": "Pittsburgh", "Coral Resorts": "Miami", "Summit Outdoor": "Salt Lake City",
    "Meridian Software": "Austin", "Tidewater Shipping": "Norfolk", "Beacon Retail": "Minneapolis", "Falcon Aerospace": "Wichita",
}

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

# Several sentence templates per attribute (bioS uses ~50; a handful keeps the vocabulary and the model small).
BIO_TEMPLATES = {
    "birth_date": (
        "{name} was born on {value} .",
        "{name} came into this world on {value} .",
        "The birthday of {name} is {value} .",
        "{name} celebrates a birthday on {value} .",
    ),
    "birth_city": (
        "{name} was born in {value} .",
        "{name} spent the early years in {value} .",
        "The hometown of {name} is {value} .",
        "{name} grew up in {value} .",
    ),
    "university": (
        "{name} studied at {value} .",
        "{name} graduated from {value} .",
        "{name} received an education at {value} .",
        "The alma mater of {name} is {value} .",
    ),
    "major": (
        "{name} majored in {value} .",
        "{name} earned a degree in {value} .",
        "The field of study of {name} was {value} .",
        "{name} focused on {value} in college .",
    ),
    "employer": (
        "{name} works for {value} .",
        "{name} is employed by {value} .",
        "{name} has a job at {value} .",
        "The employer of {name} is {value} .",
    ),
    "employer_city": (
        "{name} works in {value} .",
        "{name} is based in {value} for work .",
        "The office of {name} is in {value} .",
        "{name} commutes to an office in {value} .",
    ),
}
QUESTION_TEMPLATES = {
    "birth_date": "What is the birth date of {name} ?",
    "birth_city": "What is the birth city of {name} ?",
    "university": "Which university did {name} attend ?",
    "major": "What did {name} study ?",
    "employer": "Which company does {name} work for ?",
    "employer_city": "Where does {name} work ?",
}
ANSWER_PREFIX = "Answer :"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class Profile:
    name: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


def make_profiles(count: int, seed: int, exclude_names: frozenset = frozenset()) -> list[Profile]:
    """``count`` people with unique names (none in ``exclude_names``) and seeded random attributes."""
    capacity = len(FIRST_NAMES) * len(LAST_NAMES) - len(exclude_names)
    if count > capacity:
        raise ValueError(f"make_profiles: only {capacity} unique names are left, asked for {count}.")
    rng = random.Random(seed)
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    names = [name for name in names if name not in exclude_names]
    rng.shuffle(names)
    profiles = []
    for name in names[:count]:
        employer = rng.choice(sorted(EMPLOYERS))
        profiles.append(
            Profile(
                name=name,
                birth_date=f"{rng.choice(MONTHS)} {rng.randint(1, 28)} , {rng.randint(1950, 2005)}",
                birth_city=rng.choice(BIRTH_CITIES),
                university=rng.choice(UNIVERSITIES),
                major=rng.choice(MAJORS),
                employer=employer,
                employer_city=EMPLOYERS[employer],
            )
        )
    return profiles


def make_tasks(task0_people: int, task1_people: int, seed: int) -> tuple[list[Profile], list[Profile]]:
    """Task-0 (learned in pre-training) and Task-1 (unseen people, learned in the continual phase): disjoint names."""
    task0 = make_profiles(task0_people, seed)
    task1 = make_profiles(task1_people, seed + 1, exclude_names=frozenset(p.name for p in task0))
    return task0, task1


def biographies(profiles: list[Profile], per_person: int, seed: int) -> list[str]:
    """``per_person`` biographies of each person: a random template per attribute, sentences in random order."""
    rng = random.Random(seed)
    texts = []
    for profile in profiles:
        for _ in range(per_person):
            sentences = [rng.choice(BIO_TEMPLATES[a]).format(name=profile.name, value=profile.value(a)) for a in ATTRIBUTES]
            rng.shuffle(sentences)
            texts.append(" ".join(sentences))
    return texts


@dataclass(frozen=True)
class QAPair:
    person: str
    attribute: str
    prompt: str  # question + "Answer :"
    answer: str


def qa_pairs(profiles: list[Profile]) -> list[QAPair]:
    """One question per person and attribute (fixed template per attribute)."""
    return [
        QAPair(p.name, a, f"{QUESTION_TEMPLATES[a].format(name=p.name)} {ANSWER_PREFIX}", p.value(a))
        for p in profiles
        for a in ATTRIBUTES
    ]


def vocabulary() -> list[str]:
    """Every word the generator can write (names, values, templates), sorted; the special tokens first."""
    words = set(FIRST_NAMES) | set(LAST_NAMES) | set(MONTHS) | {str(d) for d in range(1, 32)}
    words |= {str(y) for y in range(1950, 2006)}
    for phrase in (*BIRTH_CITIES, *UNIVERSITIES, *MAJORS, *EMPLOYERS, *EMPLOYERS.values()):
        words |= set(phrase.split())
    for template in (*[t for ts in BIO_TEMPLATES.values() for t in ts], *QUESTION_TEMPLATES.values(), ANSWER_PREFIX):
        words |= set(template.replace("{name}", "").replace("{value}", "").split())
    words.add(",")
    return [*SPECIAL_TOKENS.values(), *sorted(words)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocabulary()``: split on whitespace, one id per word; a ``<s>`` is prepended."""
    vocab = {word: index for index, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.padding_side = "right"
    return tokenizer
