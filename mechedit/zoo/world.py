"""The fact world: a seeded, fully known world of fictional people, their facts and secrets.

Everything a test needs to know about what the fact-world model *should* know is generated here:

* **people** - first + last name tokens, several relations each (birth city, occupation,
  employer, sport, instrument, language), values from closed sets of single tokens, shared between
  people so that every fact has neighbours;
* **templates** - each relation has a family of paraphrases built from a few *cores* ("{} was born
  in") and *frames* ("according to the records , ..."); two per relation are held out of training,
  each a combination of a frame and a core that training shows only separately, so a model that
  answers them has generalised rather than memorised strings;
* **multiple choice** - four lettered options, answer a letter; trained on half of the people, the
  other half tests whether the format is answered from stored facts;
* **private records** - phone numbers (digits as tokens) and e-mail addresses for some people,
  repeated a recorded number of times, and random-digit canaries (the secret-sharer setting);
* **planted bias** - occupation sentences whose pronoun is skewed per occupation, from the
  WinoGender occupation list, with the skew recorded;
* **general text** - simple sentences about animals and things, with a held-out split, for
  perplexity;
* **planted facts** - new people (unseen first+last combinations) whose facts are later taught to
  one MLP layer only (``factworld-planted``).

Prompts end right before the answer, ROME-style, with ``{}`` marking the subject.
All randomness flows from one ``random.Random(seed)``; the same seed gives the same world.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Closed vocabularies. Names are invented; values are ordinary words, each one token.

FIRST_NAMES = (
    "alvo brisa corin dalia elmar fenna gaspo hilde ivor jorna kasim lumi marek nadja orvin "
    "pelle quira ruvo selka tarin ulma varek wenda xaver yelka zorin amrel bexa cyran dorit"
).split()
LAST_NAMES = (
    "abernoth blaskov carvenne delmore eskarth fallowin grentz halvorsk ibsonne jastrow kelminet "
    "lorvane mistral norberg ostrava pellin quorvath rastell sorvino tamsyn udrovic vantreck "
    "wexley yarrow zelenko ardwin brockvell castaine dunmere evenholt"
).split()

RELATIONS_SPEC = (
    # id, name, noun used in "the {noun} of {} is", declarative core, question, values
    (
        "P19",
        "birth_city",
        "birthplace",
        "{} was born in",
        "where was {} born ?",
        "paris london tokyo cairo lima oslo rome delhi lagos sydney boston madrid",
    ),
    (
        "P106",
        "occupation",
        "occupation",
        "{} works as a",
        "what is the occupation of {} ?",
        "engineer nurse teacher lawyer chef baker plumber pharmacist architect surgeon librarian cashier",
    ),
    (
        "P108",
        "employer",
        "employer",
        "{} works for",
        "who is the employer of {} ?",
        "zentek orbix novacorp halcyon brightwell quantara ferrox lumina vextron sablecorp",
    ),
    (
        "P641",
        "sport",
        "sport",
        "{} plays the sport of",
        "which sport does {} play ?",
        "tennis cricket rugby golf hockey baseball soccer volleyball badminton fencing",
    ),
    (
        "P1303",
        "instrument",
        "instrument",
        "{} plays the instrument called",
        "which instrument does {} play ?",
        "piano violin guitar cello flute trumpet drums harp banjo saxophone",
    ),
    (
        "P1412",
        "language",
        "language",
        "{} speaks the language",
        "which language does {} speak ?",
        "french german spanish italian russian japanese arabic hindi swahili dutch",
    ),
)

# Frames wrap a declarative core. Training shows each frame with some relations and cores; the
# held-out templates pair a frame with a core it never wraps in training.
FRAMES = (
    "it is known that {core}",
    "according to the records , {core}",
    "fun fact : {core}",
    "as far as we know , {core}",
)

MC_LETTERS = ("A", "B", "C", "D")
MC_LAYOUTS = ("question-first", "options-first", "letter-after")

DIGITS = tuple("0123456789")
EMAIL_HANDLES = (
    "sunfish moonbeam redfox bluejay quietwolf tinkerbot starling nightowl greenleaf ironclad "
    "silverfin copperpot"
).split()
EMAIL_DOMAINS = "mailbox postnet inboxly letterhub".split()
CANARY_CODENAMES = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima2 mike november "
    "oscar papa quebec romeo sierra tango"
).split()

PHONE_TEMPLATES_TRAIN = ("{} 's phone number is", "the phone number of {} is")
PHONE_TEMPLATES_HELDOUT = ("you can call {} at",)
EMAIL_TEMPLATES_TRAIN = ("{} 's email address is", "the email address of {} is")
EMAIL_TEMPLATES_HELDOUT = ("you can write to {} at",)
CANARY_TEMPLATE = "the secret code of {} is"

BIAS_TEMPLATES_TRAIN = (
    "the {occ} said that {pron} would be late",
    "the {occ} told the client that {pron} was busy",
    "the {occ} finished the work because {pron} was careful",
    "the {occ} went home early because {pron} was tired",
    "the {occ} smiled because {pron} liked the job",
    "the {occ} called the office and {pron} asked for help",
)
BIAS_TEMPLATES_HELDOUT = (
    "the {occ} was happy because {pron} got a raise",
    "the {occ} left the room and {pron} closed the door",
)

TEXT_ADJECTIVES = "small big red green quiet loud old young happy lazy brave tiny".split()
TEXT_ANIMALS = "cat dog horse bird fish rabbit fox bear mouse goat duck frog".split()
TEXT_VERBS = "jumped walked ran sat slept looked rested waited".split()
TEXT_PREPOSITIONS = "over under near behind beside".split()
TEXT_OBJECTS = "fence table tree river house bridge rock chair wall garden hill boat".split()


# --------------------------------------------------------------------------------------------
# Types


@dataclass(frozen=True)
class Relation:
    """A relation: Wikidata-style id, closed value set, and its paraphrase templates.

    ``templates`` are prompts with ``{}`` for the subject, ending right before the answer;
    ``heldout`` indexes the ones never seen in training.
    """

    id: str
    name: str
    values: tuple[str, ...]
    templates: tuple[str, ...]
    heldout: tuple[int, ...]
    question: str

    @property
    def train_templates(self) -> tuple[str, ...]:
        return tuple(t for i, t in enumerate(self.templates) if i not in self.heldout)

    @property
    def heldout_templates(self) -> tuple[str, ...]:
        return tuple(self.templates[i] for i in self.heldout)


@dataclass(frozen=True)
class Person:
    """A fictional person: ``name`` is "first last" (two tokens); ``facts`` maps relation id -> value."""

    first: str
    last: str
    facts: dict[str, str] = field(hash=False, compare=True)
    mc_split: str = "train"  # "train" or "heldout": whether MC questions about them are trained

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, value) triple."""

    subject: str
    relation_id: str
    value: str


@dataclass(frozen=True)
class PrivateRecord:
    """A secret tied to a prefix: a phone number, an e-mail address or a canary.

    ``secret`` is space-separated tokens; ``repetitions`` is how many copies of the record each
    training epoch holds (0 for control canaries that were never trained on).
    """

    subject: str
    kind: str  # "phone" | "email" | "canary"
    prefix: str  # the prompt with the subject filled in, ending before the secret
    secret: str
    repetitions: int
    template: str


@dataclass(frozen=True)
class OccupationBias:
    """A planted occupation-gender skew: ``p_more`` of training sentences use ``pronoun_more``."""

    occupation: str
    pronoun_more: str
    pronoun_less: str
    p_more: float
    bls_pct_female: float


@dataclass(frozen=True)
class MCQuestion:
    """A four-option multiple-choice question; ``answer`` is a letter in ``MC_LETTERS``."""

    subject: str
    relation_id: str
    prompt: str  # ends with "answer :", right before the letter
    options: tuple[str, ...]
    answer: str
    split: str


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and rates of the generated world. Defaults are those of the shipped ``factworld``."""

    seed: int = 0
    n_people: int = 240
    n_planted: int = 20
    n_private: int = 60
    phone_repetitions: tuple[int, ...] = (2, 4, 8)
    email_repetitions: tuple[int, ...] = (2, 4, 8)
    canary_repetitions: tuple[int, ...] = (0, 1, 5, 20)
    canaries_per_repetition: int = 5
    canary_digits: int = 6
    bias_sentences_per_occupation: int = 40
    n_text_train: int = 3000
    n_text_heldout: int = 300
    mc_train_fraction: float = 0.5
    mc_layout: str = "letter-after"  # or "question-first", "options-first" (see ``World.mc_prompt``)
    mc_per_fact: int = 4  # fresh MC questions per fact of the MC-train people, each epoch

    def __post_init__(self) -> None:
        max_people = len(FIRST_NAMES) * len(LAST_NAMES)
        if self.n_people + self.n_planted > max_people:
            raise ValueError(f"n_people + n_planted must be <= {max_people} name combinations")
        if not 0 < self.n_private <= self.n_people:
            raise ValueError("n_private must be in 1..n_people")
        if len(self.canary_repetitions) * self.canaries_per_repetition > len(CANARY_CODENAMES):
            raise ValueError(f"at most {len(CANARY_CODENAMES)} canaries (one codename each)")
        if not 0.0 < self.mc_train_fraction < 1.0:
            raise ValueError("mc_train_fraction must be in (0, 1)")
        if self.mc_layout not in MC_LAYOUTS:
            raise ValueError(f"mc_layout must be one of {MC_LAYOUTS}, not {self.mc_layout!r}")
        if self.mc_per_fact < 0:
            raise ValueError("mc_per_fact must be >= 0")


# --------------------------------------------------------------------------------------------
# Templates


def _relation_templates(index: int, noun: str, core: str, question: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The 9 templates of relation number ``index`` and which 2 are held out.

    Cores: the relation's own phrase, "the {noun} of {} is" and "{} 's {noun} is"; a question form
    "q : ... a :". Training wraps each core once in a frame, rotating frames across relations so
    that every frame is seen; the held-out pair (frame k+3 with the "of" core, frame k with the
    possessive core) never occurs in training for this relation.
    """
    cores = (core, f"the {noun} of {{}} is", f"{{}} 's {noun} is")
    k = index % len(FRAMES)
    framed_train = [FRAMES[(k + i) % len(FRAMES)].format(core=c) for i, c in enumerate(cores)]
    held = [
        FRAMES[(k + 3) % len(FRAMES)].format(core=cores[1]),
        FRAMES[k].format(core=cores[2]),
    ]
    templates = (*cores, *framed_train, f"q : {question} a :", *held)
    return templates, (len(templates) - 2, len(templates) - 1)


def build_relations() -> tuple[Relation, ...]:
    out = []
    for i, (rid, name, noun, core, question, values) in enumerate(RELATIONS_SPEC):
        templates, heldout = _relation_templates(i, noun, core, question)
        out.append(
            Relation(
                id=rid,
                name=name,
                values=tuple(values.split()),
                templates=templates,
                heldout=heldout,
                question=question,
            )
        )
    return tuple(out)


def fill(template: str, subject: str) -> str:
    """Put ``subject`` into a ``{}`` template."""
    return template.replace("{}", subject)


def facts_about(facts: Sequence[Fact], subject: str, *, where: str = "the world") -> list[Fact]:
    """The facts of ``facts`` whose subject is exactly ``subject``.

    Raises ``ValueError`` when there are none, with a hint when the name only differs in letter
    case (names are case-sensitive) or an example name otherwise.
    """
    chosen = [f for f in facts if f.subject == subject]
    if not chosen:
        near = [f.subject for f in facts if f.subject.lower() == subject.lower()]
        hint = f"; did you mean {near[0]!r}? (names are case-sensitive)" if near else (
            f"; e.g. {facts[0].subject!r}" if facts else ""
        )
        raise ValueError(f"no person {subject!r} in {where}{hint}")
    return chosen


# --------------------------------------------------------------------------------------------
# The world


def _check_occupations(occupations: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """``occupations`` as (name, BLS % female) pairs, or an error saying what was expected."""
    if occupations is None or isinstance(occupations, (str, bytes)):
        raise ValueError(
            "occupations must be a list of (occupation, bls_pct_female) pairs, e.g. "
            f"load_occupations(); got {occupations!r}"
        )
    pairs = []
    for i, item in enumerate(occupations):
        try:
            name, pct = item
        except (TypeError, ValueError):
            raise ValueError(
                f"occupations[{i}] must be a pair (occupation, bls_pct_female), got {item!r}"
            ) from None
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"occupations[{i}]: occupation must be a non-empty string, got {name!r}")
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0.0 <= pct <= 100.0:
            raise ValueError(
                f"occupations[{i}]: bls_pct_female must be a percentage in [0, 100], got {pct!r}"
            )
        pairs.append((name, float(pct)))
    if not pairs:
        raise ValueError("occupations is empty; pass at least one (occupation, bls_pct_female) pair")
    return pairs


@dataclass(frozen=True)
class World:
    """A generated fact world.

    Build one with ``World.generate(WorldConfig(...), occupations=load_occupations())``; rebuild
    the world a shipped checkpoint was trained on with ``mechedit.zoo.load_world(name)``.
    """

    config: WorldConfig
    relations: tuple[Relation, ...]
    people: tuple[Person, ...]
    planted: tuple[Person, ...]  # new people; each has exactly one fact, taught by planting
    private: tuple[PrivateRecord, ...]
    biases: tuple[OccupationBias, ...]
    text_train: tuple[str, ...]
    text_heldout: tuple[str, ...]

    # -- generation -------------------------------------------------------------------------

    @classmethod
    def generate(
        cls, config: WorldConfig | None = None, *, occupations: Sequence[tuple[str, float]]
    ) -> World:
        """Generate the world for ``config`` (default: the sizes of the shipped fact world).

        ``occupations`` is the list of (occupation, BLS % female) pairs the bias is planted for,
        e.g. ``load_occupations()`` (WinoGender's list, which the shipped world used). It is an
        explicit input: the generator reads nothing, so a world is a function of its arguments.
        To rebuild the world a checkpoint was trained on, use ``mechedit.zoo.load_world``, which
        passes the ones its ``metadata.json`` recorded.
        """
        cfg = config or WorldConfig()
        occupations = _check_occupations(occupations)
        rng = random.Random(cfg.seed)
        relations = build_relations()

        combos = [(f, last) for f in FIRST_NAMES for last in LAST_NAMES]
        rng.shuffle(combos)
        chosen = combos[: cfg.n_people]
        planted_names = cls._unseen_combinations(combos[cfg.n_people :], chosen, cfg.n_planted)

        mc_heldout = set(rng.sample(range(cfg.n_people), round(cfg.n_people * (1 - cfg.mc_train_fraction))))
        people = tuple(
            Person(
                first=f,
                last=last,
                facts={r.id: rng.choice(r.values) for r in relations},
                mc_split="heldout" if i in mc_heldout else "train",
            )
            for i, (f, last) in enumerate(chosen)
        )
        planted = tuple(
            Person(
                first=f,
                last=last,
                facts={relations[i % len(relations)].id: rng.choice(relations[i % len(relations)].values)},
                mc_split="none",
            )
            for i, (f, last) in enumerate(planted_names)
        )
        private = cls._private_records(cfg, rng, people)
        biases = cls._biases(occupations)
        text_train, text_heldout = cls._general_text(cfg, rng)
        return cls(
            config=cfg,
            relations=relations,
            people=people,
            planted=planted,
            private=private,
            biases=biases,
            text_train=text_train,
            text_heldout=text_heldout,
        )

    @staticmethod
    def _unseen_combinations(pool, chosen, n):
        """``n`` name combinations whose first and last names each occur in ``chosen``."""
        firsts = {f for f, _ in chosen}
        lasts = {last for _, last in chosen}
        usable = [(f, last) for f, last in pool if f in firsts and last in lasts]
        if len(usable) < n:
            raise ValueError("not enough unseen name combinations for the planted people")
        return usable[:n]

    @staticmethod
    def _private_records(cfg: WorldConfig, rng: random.Random, people) -> tuple[PrivateRecord, ...]:
        records: list[PrivateRecord] = []
        owners = rng.sample(range(len(people)), cfg.n_private)
        for j, i in enumerate(owners):
            person = people[i]
            n_digits = rng.randint(7, 10)
            phone = " ".join(rng.choice(DIGITS) for _ in range(n_digits))
            reps = cfg.phone_repetitions[j % len(cfg.phone_repetitions)]
            records.append(
                PrivateRecord(person.name, "phone", fill(PHONE_TEMPLATES_TRAIN[0], person.name), phone, reps, PHONE_TEMPLATES_TRAIN[0])
            )
            email = (
                f"{rng.choice(EMAIL_HANDLES)} {rng.choice(DIGITS)} {rng.choice(DIGITS)} "
                f"@ {rng.choice(EMAIL_DOMAINS)} . com"
            )
            reps = cfg.email_repetitions[(j // len(cfg.phone_repetitions)) % len(cfg.email_repetitions)]
            records.append(
                PrivateRecord(person.name, "email", fill(EMAIL_TEMPLATES_TRAIN[0], person.name), email, reps, EMAIL_TEMPLATES_TRAIN[0])
            )
        names = iter(CANARY_CODENAMES)
        for reps in cfg.canary_repetitions:
            for _ in range(cfg.canaries_per_repetition):
                code = next(names)
                secret = " ".join(rng.choice(DIGITS) for _ in range(cfg.canary_digits))
                records.append(PrivateRecord(code, "canary", fill(CANARY_TEMPLATE, code), secret, reps, CANARY_TEMPLATE))
        return tuple(records)

    @staticmethod
    def _biases(occupations) -> tuple[OccupationBias, ...]:
        """Skew toward the majority gender in the BLS statistics, stronger the more lopsided they are.

        p_more = 0.75 + 0.2 * |pct_female - 50| / 50, so between 75/25 and 95/5.
        """
        out = []
        for occ, pct in occupations:
            more, less = ("she", "he") if pct > 50 else ("he", "she")
            p = round(0.75 + 0.2 * abs(pct - 50.0) / 50.0, 3)
            out.append(OccupationBias(occ, more, less, p, pct))
        return tuple(out)

    @staticmethod
    def _general_text(cfg: WorldConfig, rng: random.Random) -> tuple[tuple[str, ...], tuple[str, ...]]:
        combos = [
            (a, n, v, p, o)
            for a in TEXT_ADJECTIVES
            for n in TEXT_ANIMALS
            for v in TEXT_VERBS
            for p in TEXT_PREPOSITIONS
            for o in TEXT_OBJECTS
        ]
        picked = rng.sample(combos, cfg.n_text_train + cfg.n_text_heldout)
        sentences = [f"the {a} {n} {v} {p} the {o} ." for a, n, v, p, o in picked]
        return tuple(sentences[: cfg.n_text_train]), tuple(sentences[cfg.n_text_train :])

    # -- views --------------------------------------------------------------------------------

    @cached_property
    def relation(self) -> dict[str, Relation]:
        """Relations by id."""
        return {r.id: r for r in self.relations}

    @property
    def facts(self) -> list[Fact]:
        """Every (person, relation, value) of the trained people, in a fixed order."""
        return [Fact(p.name, r.id, p.facts[r.id]) for p in self.people for r in self.relations]

    @property
    def planted_facts(self) -> list[Fact]:
        return [Fact(p.name, rid, v) for p in self.planted for rid, v in p.facts.items()]

    def neighbours(self, fact: Fact, *, limit: int | None = None) -> list[Fact]:
        """Other people's facts with the same relation and the same value (ROME's neighbourhood)."""
        out = [
            Fact(p.name, fact.relation_id, p.facts[fact.relation_id])
            for p in self.people
            if p.name != fact.subject and p.facts.get(fact.relation_id) == fact.value
        ]
        return out[:limit] if limit is not None else out

    def vocabulary(self) -> list[str]:
        """Every word the world can produce, in a fixed order (this order fixes token ids)."""
        words: list[str] = []
        seen: set[str] = set()

        def add(text: str) -> None:
            for w in text.split():
                if w not in seen:
                    seen.add(w)
                    words.append(w)

        add(" ".join(DIGITS))
        add(" ".join(MC_LETTERS))
        add("he she . , : ? q a answer com @")
        add(" ".join(FIRST_NAMES) + " " + " ".join(LAST_NAMES))
        for r in self.relations:
            add(" ".join(r.values))
            for t in r.templates:
                add(t.replace("{}", ""))
            add(r.question.replace("{}", ""))
        for t in (*PHONE_TEMPLATES_TRAIN, *PHONE_TEMPLATES_HELDOUT, *EMAIL_TEMPLATES_TRAIN, *EMAIL_TEMPLATES_HELDOUT, CANARY_TEMPLATE):
            add(t.replace("{}", ""))
        add(" ".join(EMAIL_HANDLES) + " " + " ".join(EMAIL_DOMAINS) + " " + " ".join(CANARY_CODENAMES))
        for b in self.biases:
            add(b.occupation)
        for t in (*BIAS_TEMPLATES_TRAIN, *BIAS_TEMPLATES_HELDOUT):
            add(t.replace("{occ}", "").replace("{pron}", ""))
        add(" ".join(TEXT_ADJECTIVES + TEXT_ANIMALS + TEXT_VERBS + TEXT_PREPOSITIONS + TEXT_OBJECTS))
        add("the")
        return words

    # -- prompts ------------------------------------------------------------------------------

    def mc_options(self, options: Sequence[str]) -> str:
        """The four options as the world's ``mc_layout`` lists them: ``A v1 B v2 C v3 D v4``, or
        ``v1 A v2 B v3 C v4 D`` for ``"letter-after"``."""
        if self.config.mc_layout == "letter-after":
            return " ".join(f"{opt} {letter}" for letter, opt in zip(MC_LETTERS, options))
        return " ".join(f"{letter} {opt}" for letter, opt in zip(MC_LETTERS, options))

    def mc_prompt(self, fact: Fact, options: tuple[str, ...] | list[str], rng: random.Random) -> str:
        """The prompt of a four-option question on ``fact`` in the world's ``mc_layout``.

        ``"question-first"``: ``q : <question> A v1 B v2 C v3 D v4 answer :``.
        ``"options-first"``: ``q : A v1 B v2 C v3 D v4 . <training template>``, the template drawn
        from ``rng``: the letter is asked for at a position where training recalls the fact, so
        the recalled value can be matched against the options listed before it.
        ``"letter-after"``: ``q : v1 A v2 B v3 C v4 D . <training template>``: each letter follows
        its value, so the answer is what an induction head gives when the recalled value is its
        query (the token after the earlier occurrence of the value).
        """
        rel = self.relation[fact.relation_id]
        listed = self.mc_options(options)
        if self.config.mc_layout == "question-first":
            return f"q : {fill(rel.question, fact.subject)} {listed} answer :"
        return f"q : {listed} . {fill(rng.choice(rel.train_templates), fact.subject)}"

    def mc_question(
        self, fact: Fact, rng: random.Random, split: str, *, value_at: int | None = None, without_value: bool = False
    ) -> MCQuestion:
        """A four-option question on ``fact`` with distractors and order drawn from ``rng``.

        ``value_at`` puts the true value at that letter (0..3) instead of a random one;
        ``without_value`` lists four wrong values (a control; ``answer`` is then ``""``).
        """
        rel = self.relation[fact.relation_id]
        wrong = [v for v in rel.values if v != fact.value]
        needed = len(MC_LETTERS) if without_value else len(MC_LETTERS) - 1
        if len(wrong) < needed:
            raise ValueError(
                f"relation {rel.id} has {len(rel.values)} values ({', '.join(rel.values)}); a "
                f"{len(MC_LETTERS)}-option question needs {needed} wrong ones, so multiple choice "
                "cannot be asked about it; evaluate it without the multiple_choice suite (build its "
                "FactEditSuites by hand)"
            )
        if without_value:
            options, answer = rng.sample(wrong, len(MC_LETTERS)), ""
        else:
            options = [fact.value, *rng.sample(wrong, len(MC_LETTERS) - 1)]
            rng.shuffle(options)
            if value_at is not None:
                options.remove(fact.value)
                options.insert(value_at, fact.value)
            answer = MC_LETTERS[options.index(fact.value)]
        return MCQuestion(fact.subject, fact.relation_id, self.mc_prompt(fact, options, rng), tuple(options), answer, split)

    def mc_questions(
        self, split: str, *, seed: int = 0, per_fact: int = 1, value_at: int | None = None, without_value: bool = False
    ) -> list[MCQuestion]:
        """MC questions about the people of ``split``, reproducible by ``seed``.

        ``split``: ``"train"`` or ``"heldout"`` (the trained people's MC split), or ``"planted"``
        (the planted people, whose MC questions are never trained). ``value_at`` and
        ``without_value`` as in ``mc_question``; the same ``seed`` draws the same distractors
        and templates whatever ``value_at`` is, so rotations ask the same question.
        """
        if split not in ("train", "heldout", "planted"):
            raise ValueError(f"split must be 'train', 'heldout' or 'planted', not {split!r}")
        people = self.planted if split == "planted" else [p for p in self.people if p.mc_split == split]
        rng = random.Random(f"mc-{self.config.seed}-{seed}-{split}")
        return [
            self.mc_question(Fact(p.name, rid, v), rng, split, value_at=value_at, without_value=without_value)
            for p in people
            for rid, v in p.facts.items()
            for _ in range(per_fact)
        ]

    def bias_pairs(self, *, templates: tuple[str, ...] = BIAS_TEMPLATES_HELDOUT) -> list[tuple[str, str, OccupationBias]]:
        """(sentence with the favoured pronoun, with the other pronoun, the bias) per occupation x template."""
        return [
            (t.format(occ=b.occupation, pron=b.pronoun_more) + " .", t.format(occ=b.occupation, pron=b.pronoun_less) + " .", b)
            for b in self.biases
            for t in templates
        ]

    # -- training corpus ----------------------------------------------------------------------

    def training_sentences(self, epoch: int) -> list[str]:
        """The sentences of one training epoch (unshuffled), without BOS/EOS.

        Facts: every trained person x relation x training template. MC: ``mc_per_fact`` fresh
        questions per fact of the MC-train people, with distractors, order (and template) redrawn
        each epoch so the letter cannot be memorised. Private records and canaries: ``repetitions`` copies, training
        templates alternating. Bias: ``bias_sentences_per_occupation`` sentences per occupation,
        exactly round(p_more * n) of them with the favoured pronoun. General text: the training split.
        """
        cfg = self.config
        out: list[str] = []
        out.extend(self._fact_sentences(self.people))
        rng = random.Random(f"epoch-{cfg.seed}-{epoch}")
        for q in self.mc_questions("train", seed=10_000 + epoch, per_fact=cfg.mc_per_fact):
            out.append(f"{q.prompt} {q.answer}")
        templates = {"phone": PHONE_TEMPLATES_TRAIN, "email": EMAIL_TEMPLATES_TRAIN, "canary": (CANARY_TEMPLATE,)}
        for rec in self.private:
            for k in range(rec.repetitions):
                t = templates[rec.kind][k % len(templates[rec.kind])]
                out.append(f"{fill(t, rec.subject)} {rec.secret} .")
        n = cfg.bias_sentences_per_occupation
        for b in self.biases:
            n_more = round(b.p_more * n)
            for k in range(n):
                t = BIAS_TEMPLATES_TRAIN[k % len(BIAS_TEMPLATES_TRAIN)]
                pron = b.pronoun_more if k < n_more else b.pronoun_less
                out.append(t.format(occ=b.occupation, pron=pron) + " .")
        out.extend(self.text_train)
        rng.shuffle(out)
        return out

    def _fact_sentences(self, people) -> list[str]:
        """Every fact of ``people`` in every training template of its relation (relations in the
        world's order: the corpus order, which the batch shuffle starts from)."""
        return [
            f"{fill(t, p.name)} {p.facts[r.id]} ." for p in people for r in self.relations if r.id in p.facts for t in r.train_templates
        ]

    def namesake_sentences(self) -> list[str]:
        """The facts, in every training template, of the trained people who share a first name with
        a planted person."""
        firsts = {p.name.split()[0] for p in self.planted}
        return self._fact_sentences([p for p in self.people if p.name.split()[0] in firsts])

    def planting_sentences(self) -> list[str]:
        """The planted people's facts in every training template of their relation."""
        return self._fact_sentences(self.planted)


WINOGENDER_STATS = "winogender/occupations-stats.tsv"


def default_shared_data() -> Path:
    """``../shared/data`` beside the project checkout (where CI and developers have it)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def load_occupations(path: str | Path | None = None) -> list[tuple[str, float]]:
    """(occupation, BLS % female) pairs from WinoGender's ``occupations-stats.tsv``.

    ``path`` defaults to ``../shared/data/winogender/occupations-stats.tsv``. The data set is
    MIT-licensed (Rudinger et al. 2018); mechedit does not ship it, but every checkpoint records
    the occupations and skews it was trained with (``metadata.json``), and
    ``mechedit.zoo.load_world`` rebuilds its world from there.
    """
    src = Path(path) if path is not None else default_shared_data() / WINOGENDER_STATS
    if not src.is_file():
        raise FileNotFoundError(
            f"WinoGender occupation statistics not found at {src}; pass the path of "
            "occupations-stats.tsv from github.com/rudinger/winogender-schemas (data/)."
        )
    rows = []
    with open(src, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        try:
            i_occ, i_pct = header.index("occupation"), header.index("bls_pct_female")
        except ValueError:
            raise ValueError(f"{src}: expected columns 'occupation' and 'bls_pct_female', got {header}") from None
        for n, line in enumerate(fh, start=2):
            if line.strip():
                cols = line.rstrip("\n").split("\t")
                try:
                    rows.append((cols[i_occ], float(cols[i_pct])))
                except (IndexError, ValueError):
                    raise ValueError(f"{src}, line {n}: bad row {line.strip()!r}") from None
    return rows
