"""The built-in keyboard corpus: short chat messages typed by simulated people.

`fedboard simulate` needs text that looks like what people type on a phone and that is
split across users the way real keyboards are: NON-IID. Each simulated user has a persona
(a few favourite topics out of 19, friends and places of their own, favourite foods, shows,
teams..., one way of saying "you", "good", "ok", "haha", greetings, sign-offs, catch phrases,
optionally no apostrophes). Messages come from topic templates filled from the persona, so
there is plenty of structure for a small LSTM to learn in a few federated rounds, while two
users' word distributions differ far more than two random halves of the same text would.

Deterministic for a seed (user i depends only on `(seed, i)`), numpy + stdlib only, about
half a second for 300 users.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import numpy as np

from models.corpus import Corpus

# --- how people say the same thing: a persona picks one variant of each and mostly sticks to it
STYLE: dict[str, tuple[str, ...]] = {
    "you": ("you", "u", "ya"),
    "your": ("your", "ur"),
    "want": ("want to", "wanna", "fancy"),
    "gonna": ("going to", "gonna"),
    "think": ("i think", "i reckon", "i guess", "imo", "i feel like", "pretty sure"),
    "really": ("really", "so", "super", "well", "proper", "dead", "mega"),
    "good": ("good", "great", "amazing", "awesome", "brilliant", "sick", "lovely", "class", "epic"),
    "bad": ("bad", "awful", "rubbish", "terrible", "shocking", "dire", "grim"),
    "ok": ("ok", "okay", "k", "sure", "sounds good", "cool", "fine by me", "alright", "deal"),
    "yes": ("yes", "yeah", "yep", "ya", "yup", "aye", "totally"),
    "no": ("no", "nah", "nope", "not really"),
    "thanks": ("thanks", "thx", "ty", "cheers", "thank you", "ta", "thanks a lot"),
    "please": ("please", "pls", "plz"),
    "laugh": ("haha", "lol", "lmao", "hahaha", "hehe", "rofl", "omg"),
    "sorry": ("sorry", "soz", "sry", "my bad", "apologies"),
    "mum": ("mum", "mom", "ma", "mother"),
    "dad": ("dad", "pops", "my old man", "father"),
    "late": ("late", "a bit late", "behind", "running behind"),
    "hungry": ("hungry", "starving", "famished", "peckish"),
    "tired": ("tired", "knackered", "exhausted", "shattered", "dead tired"),
}

# --- what people talk about; a persona has favourites in each list and uses them most
CONTENT: dict[str, tuple[str, ...]] = {
    "time": ("tonight", "tomorrow", "later", "this weekend", "after work", "this afternoon",
             "tomorrow night", "tomorrow morning", "next week", "today", "this evening",
             "after lunch", "right now", "on saturday", "on friday night", "before work"),
    "day": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
            "the weekend", "next monday", "friday morning"),
    "clock": ("six", "seven", "eight", "nine", "ten", "half six", "half seven", "half eight",
              "noon", "midday", "five", "four", "three", "eleven", "quarter past six",
              "quarter to eight", "seven thirty", "six ish", "eight ish"),
    "minutes": ("five minutes", "ten minutes", "two minutes", "five mins", "ten mins",
                "twenty minutes", "half an hour", "a sec", "a bit"),
    "activity": ("drinks", "coffee", "lunch", "dinner", "brunch", "a walk", "the cinema",
                 "a movie", "the gym", "football", "bowling", "karaoke", "a swim", "pizza",
                 "the match", "a bike ride", "quiz night", "board games", "a run", "tennis"),
    "food": ("pizza", "pasta", "sushi", "curry", "tacos", "burgers", "noodles", "kebab",
             "chinese", "thai", "fish and chips", "ramen", "salad", "pancakes", "roast dinner",
             "chicken wings", "lasagne", "dumplings", "burritos", "soup", "steak", "falafel",
             "pad thai", "sandwiches", "fried chicken", "risotto", "chilli", "nachos", "pho",
             "stir fry", "toast", "cereal", "eggs", "bagels", "waffles", "biryani"),
    "drink": ("coffee", "a beer", "wine", "tea", "a pint", "cocktails", "a smoothie",
              "bubble tea", "hot chocolate", "prosecco", "cider", "a flat white", "lemonade"),
    "meal": ("dinner", "lunch", "breakfast", "tea", "supper", "brunch"),
    "work_thing": ("report", "presentation", "slides", "budget", "spreadsheet", "proposal",
                   "invoice", "deadline", "review", "project", "code", "client email",
                   "quarterly numbers", "contract", "schedule", "rota", "timesheet"),
    "work_team": ("sales", "marketing", "design", "finance", "support", "product", "london",
                  "legal", "hr", "dev", "ops", "new york", "client"),
    "relative": ("grandma", "grandpa", "my sister", "my brother", "auntie", "my uncle",
                 "the kids", "my cousin", "nan", "my niece", "my nephew", "the in laws",
                 "my little brother", "my big sister"),
    "kid_state": ("asleep finally", "driving me mad", "being so good", "off school",
                  "watching cartoons", "bouncing off the walls", "at football practice",
                  "still awake", "at the park", "doing homework"),
    "weather_adj": ("freezing", "boiling", "raining", "windy", "sunny", "foggy", "chilly",
                    "humid", "roasting", "grey", "snowing", "pouring", "lovely", "miserable"),
    "city": ("london", "paris", "berlin", "rome", "madrid", "lisbon", "dublin", "amsterdam",
             "barcelona", "edinburgh", "manchester", "new york", "tokyo", "prague", "vienna",
             "brighton", "glasgow", "leeds", "bristol", "copenhagen", "athens", "budapest",
             "bangkok", "sydney", "toronto", "cornwall", "the lakes", "scotland", "spain"),
    "show": ("the office", "friends", "stranger things", "the crown", "bake off", "love island",
             "succession", "the bear", "severance", "the last of us", "squid game", "peaky blinders",
             "game of thrones", "ted lasso", "the traitors", "doctor who", "line of duty",
             "breaking bad", "the simpsons", "house of the dragon", "strictly", "gogglebox"),
    "artist": ("taylor swift", "drake", "adele", "ed sheeran", "beyonce", "coldplay", "stormzy",
               "dua lipa", "the weeknd", "harry styles", "billie eilish", "arctic monkeys",
               "kendrick", "olivia rodrigo", "oasis", "queen", "radiohead", "rihanna", "sza",
               "fred again", "dave", "blur", "abba", "bad bunny"),
    "subject": ("maths", "history", "chemistry", "biology", "physics", "english", "french",
                "economics", "geography", "spanish", "stats", "law", "art", "psychology",
                "computer science", "philosophy"),
    "shop": ("tesco", "the supermarket", "aldi", "lidl", "the corner shop", "boots", "ikea",
             "primark", "the market", "sainsburys", "asda", "the mall", "zara", "argos",
             "the chemist", "the bakery", "waitrose", "m and s"),
    "grocery": ("milk", "bread", "eggs", "butter", "cheese", "bananas", "coffee", "toilet roll",
                "washing up liquid", "pasta", "rice", "apples", "tomatoes", "onions", "yoghurt",
                "bin bags", "chicken", "orange juice", "cereal", "teabags", "crisps", "biscuits"),
    "clothes": ("trainers", "jeans", "a jacket", "boots", "a dress", "a coat", "shoes",
                "a hoodie", "sunglasses", "a jumper", "a shirt", "shorts"),
    "sick_state": ("rough", "ill", "a bit off", "poorly", "under the weather", "sick",
                   "better", "so much better", "awful", "dizzy", "bunged up"),
    "pet": ("dog", "cat", "puppy", "kitten", "rabbit", "hamster", "parrot", "tortoise"),
    "object": ("sock", "shoe", "sandwich", "homework", "charger", "slipper", "remote",
               "headphones", "dinner", "toast", "keys", "pillow"),
    "thing": ("the tickets", "the taxi", "dinner", "the hotel", "the shopping", "the bills",
              "petrol", "the present", "the pizza", "drinks", "the flights", "the deposit"),
    "platform": ("xbox", "playstation", "steam", "discord", "switch", "the app"),
    "level_word": ("ten", "twenty", "thirty", "fifty", "a hundred", "forty", "sixty"),
    "device": ("phone", "laptop", "tablet", "wifi", "printer", "watch", "console",
               "computer", "router", "tv"),
}

# --- people and places that only one persona has (friends, local places, teams, pets)
NAMES = (
    "sam", "alex", "jo", "chris", "jamie", "charlie", "max", "lucy", "emma", "olivia", "ben",
    "tom", "jack", "harry", "sophie", "grace", "mia", "ella", "amy", "kate", "josh", "dan",
    "matt", "luke", "nick", "rob", "will", "james", "liam", "noah", "ava", "isla", "freya",
    "leah", "zoe", "chloe", "hannah", "beth", "rosie", "millie", "priya", "aisha", "omar",
    "ali", "raj", "sanjay", "mo", "yusuf", "fatima", "zara", "leila", "nina", "rosa", "marco",
    "luca", "pablo", "sofia", "elena", "ana", "carlos", "diego", "lena", "hans", "anna",
    "ingrid", "lars", "erik", "kim", "jin", "mei", "yuki", "kenji", "tariq", "kofi", "ama",
    "tunde", "ngozi", "dev", "anil", "sean", "niamh", "ciara", "connor", "aoife", "finn",
    "rory", "callum", "fraser", "ewan", "morgan", "rhys", "owen", "megan", "sian", "gareth",
    "dylan", "ruby", "poppy", "daisy", "holly", "jess", "becky", "laura", "sarah", "claire",
    "steve", "dave", "mike", "paul", "pete", "gary", "ian", "neil", "mark", "andy", "lily",
    "evie", "archie", "oscar", "leo", "theo", "arthur", "george", "freddie", "alfie",
)
PLACES = (
    "the gym", "the park", "the pub", "the office", "the station", "the library", "the beach",
    "costa", "starbucks", "pret", "the red lion", "the crown", "the king's head", "the plough",
    "nando's", "wetherspoons", "the cinema", "the bus stop", "the high street", "the market",
    "the canal", "the square", "the leisure centre", "the rec", "uni", "school", "the club",
    "the cafe", "the chippy", "the garden centre", "the river", "the old bridge", "the bowling alley",
    "the town hall", "the museum", "the food court", "the car park", "the shopping centre",
    "the train station", "the pool", "the golf club", "the allotment", "the church hall",
    "the farmers market", "the stadium", "the arcade", "the lake", "the woods", "the harbour",
    "the pier", "the bakery", "the deli", "the curry house", "the noodle bar", "the pizza place",
)
TEAMS = (
    "united", "city", "arsenal", "chelsea", "liverpool", "spurs", "everton", "villa", "celtic",
    "rangers", "leeds", "newcastle", "west ham", "the lakers", "the yankees", "barca", "madrid",
    "juve", "bayern", "england", "wales", "ireland", "scotland", "the bulls", "the reds",
)
GAMES = (
    "fortnite", "minecraft", "fifa", "cod", "zelda", "mario kart", "among us", "valorant",
    "league", "apex", "rocket league", "overwatch", "elden ring", "the sims", "roblox",
    "pokemon", "wordle", "chess", "animal crossing", "gta",
)
PET_NAMES = (
    "biscuit", "luna", "bella", "max", "milo", "teddy", "poppy", "coco", "alfie", "willow",
    "pickle", "bruno", "rolo", "mabel", "otis", "ziggy", "pepper", "buster", "nala", "simba",
)
GREETINGS = ("hey", "hi", "hiya", "yo", "oi", "hello", "morning", "evening", "heya", "sup",
             "hey hey", "alright")
SIGN_OFFS = ("xx", "x", "cheers", "see ya", "talk soon", "later", "love you", "speak later",
             "ttyl", "peace", "take care", "night", "bye for now", "laters", "catch you later",
             "speak soon", "mwah", "hugs")
CATCH_PHRASES = (
    "no worries", "you know what i mean", "living the dream", "same old same old",
    "fair enough", "at the end of the day", "just saying", "for real", "to be honest",
    "can't complain", "it is what it is", "no drama", "big mood", "not gonna lie", "all good",
    "happy days", "oh well", "story of my life", "if you know you know", "watch this space",
    "mad times", "bless", "good vibes only", "as you do", "what a day", "deal with it",
    "easy peasy", "game on", "let's go", "keep calm", "onwards and upwards", "such is life",
    "you only live once", "whatever works", "no rush", "love it", "classic", "typical",
)

# --- templates per topic; {slot} names a STYLE, CONTENT or persona slot
TOPICS: dict[str, tuple[str, ...]] = {
    "plans": (
        "are we still on for {activity} {time}?",
        "{want} grab {drink} at {place} {time}?",
        "what time are we meeting at {place}?",
        "running {late}, be there in {minutes}",
        "can we do {day} instead?",
        "i'm free {time} if {you} {want} hang out",
        "who else is coming {time}?",
        "let's meet outside {place} at {clock}",
        "is {friend} coming to {activity} {time}?",
        "{think} {friend} is already at {place}",
        "shall we say {clock} at {place}?",
        "can't wait for {activity} {time}",
        "are {you} around {time}?",
        "just leaving now, see {you} at {place}",
    ),
    "food": (
        "{want} get {food} for {meal}?",
        "just made {food} and it was {really} {good}",
        "craving {food} {really} bad",
        "shall we order {food} {time}?",
        "have {you} tried the new {food} place near {place}?",
        "i'm {really} {hungry}, what are we having for {meal}?",
        "{think} i'll cook {food} {time}",
        "the {food} at {place} is {good}",
        "{food} again for {meal} {laugh}",
        "don't eat, i'm bringing {food} home",
        "what do {you} {want} for {meal}?",
    ),
    "work": (
        "stuck in a meeting until {clock}",
        "my boss wants the {work_thing} by {day}",
        "{really} busy at work {time}",
        "finishing the {work_thing} then heading home",
        "can't make it, i have to work {time}",
        "working from home {time}",
        "got a call with the {work_team} team at {clock}",
        "the {work_thing} is finally done",
        "{think} i'll be at the office late {time}",
        "so {tired} of this {work_thing}",
        "did {you} get my email about the {work_thing}?",
        "off work {day}, finally",
    ),
    "family": (
        "{mum} says {meal} is at {clock}",
        "going to see {relative} {time}",
        "can {you} pick up {relative} from {place}?",
        "{relative} is coming over on {day}",
        "call {mum} back when {you} can",
        "the kids are {kid_state}",
        "{dad} wants to know if {you} are coming {day}",
        "{relative} says hi",
        "family dinner at {mum}'s on {day}",
        "{mum} made {food} for everyone",
    ),
    "sport": (
        "did {you} see the {team} game last night?",
        "{team} were {really} {bad} today",
        "{team} were {good} tonight",
        "going for a run {time}",
        "gym {time}?",
        "the match starts at {clock}",
        "what a goal {laugh}",
        "{team} need to win on {day}",
        "training got cancelled {time}",
        "{think} {team} will win the league",
        "watching the {team} match at {place}",
    ),
    "travel": (
        "just landed in {city}",
        "flight to {city} is delayed again",
        "booked the hotel in {city} for {day}",
        "{want} go to {city} this summer?",
        "packing for {city}, so excited",
        "the train to {city} leaves at {clock}",
        "{city} was {really} {good}",
        "{think} we should go back to {city}",
        "at the airport, boarding at {clock}",
        "have {you} got the passports?",
    ),
    "games": (
        "{want} play {game} {time}?",
        "online {time}?",
        "just hit level {level_word} in {game}",
        "this boss in {game} is {really} hard",
        "the new {game} update is out",
        "add me on {platform}",
        "{game} {time}? i'm on {platform}",
        "lost again in {game} {laugh}",
        "{think} {game} is {good}",
        "join the party, {friend} is on",
    ),
    "weather": (
        "it's {weather_adj} out {time}",
        "bring an umbrella, it's going to rain",
        "{really} {weather_adj} today",
        "so cold i can't feel my hands",
        "sun's out, let's go to {place}",
        "is it {weather_adj} there too?",
        "forecast says {weather_adj} all {day}",
        "it's been {weather_adj} all week",
    ),
    "school": (
        "exam on {day}, {really} nervous",
        "did {you} finish the {subject} homework?",
        "library {time}?",
        "can {you} send me the {subject} notes?",
        "lecture got moved to {clock}",
        "{subject} essay due {day}",
        "{think} i failed the {subject} test {laugh}",
        "revising {subject} at {place} {time}",
        "no class {time}",
    ),
    "music": (
        "listening to {artist} on repeat",
        "{artist} tickets go on sale {day}",
        "the new {artist} album is {good}",
        "{want} go to the {artist} concert?",
        "gig at {place} {time}",
        "send me that playlist",
        "{think} {artist} is overrated {laugh}",
        "can't stop listening to {artist}",
    ),
    "shows": (
        "{want} watch {show} {time}?",
        "just finished {show}, no spoilers",
        "new episode of {show} {time}",
        "cinema {time}?",
        "{show} was {really} {good}",
        "have {you} seen the latest {show}?",
        "{think} {show} is getting {bad}",
        "binge watching {show} all weekend",
    ),
    "shopping": (
        "at {shop}, do {you} need anything?",
        "can {you} grab {grocery} on the way home?",
        "{shop} has a sale on",
        "we're out of {grocery} again",
        "just bought new {clothes}",
        "{please} get {grocery} and {grocery}",
        "going to {shop} {time}",
        "don't forget the {grocery}",
    ),
    "health": (
        "feeling {sick_state} today",
        "got a doctor's appointment {time}",
        "staying in bed {time}",
        "hope {you} feel better soon",
        "going to the dentist on {day}",
        "still feeling {sick_state}",
        "so {tired}, early night for me",
        "back at the gym {time}",
    ),
    "pets": (
        "{pet_name} just ate my {object}",
        "taking {pet_name} for a walk",
        "the {pet} needs to go to the vet on {day}",
        "{pet_name} is {really} cute today",
        "can {you} feed {pet_name} {time}?",
        "{pet_name} won't stop barking {laugh}",
        "{pet_name} is asleep on my {object}",
    ),
    "commute": (
        "bus is {late} again",
        "stuck in traffic on the way to {place}",
        "train's cancelled, {really} annoying",
        "can {you} give me a lift to {place}?",
        "be there in {minutes}",
        "parking at {place} is a nightmare",
        "missed the bus {laugh}",
        "on the train now, {minutes} away",
    ),
    "party": (
        "happy birthday {friend}!",
        "party at {friend}'s on {day}",
        "what should we get {friend} for their birthday?",
        "bring {drink} to the party",
        "{friend}'s birthday drinks {time} at {place}",
        "that party was {really} {good}",
        "who's coming to {friend}'s party?",
        "{think} i'm still {tired} from the party",
    ),
    "money": (
        "can {you} send me the money for {thing}?",
        "rent is due on {day}",
        "i owe {you} for {thing}",
        "{really} broke until payday",
        "shall we split the bill?",
        "just sent {you} the money for {thing}",
        "{thing} was {really} expensive",
    ),
    "tech": (
        "my {device} is about to die",
        "{really} slow {device} today",
        "can {you} send me the link?",
        "my {device} crashed again",
        "left my charger at {place}",
        "{think} my {device} is broken",
        "does {your} {device} work?",
    ),
    "chat": (
        "{ok}",
        "{yes}, {ok}",
        "{laugh} same",
        "{sorry}, just saw this",
        "what are {you} up to?",
        "miss {you}",
        "{thanks} {friend}",
        "call me when {you} can",
        "where are {you}?",
        "{no}, not {time}",
        "{yes} {please}",
        "how was {your} day?",
        "{laugh} {friend} is {really} funny",
        "{thanks}, {you} are the best",
    ),
}

_PERSONA_SLOTS = ("friend", "place", "team", "game", "pet_name")
_SLOT = re.compile(r"\{([a-z_]+)\}")


def _parse(template: str) -> tuple[tuple[bool, str], ...]:
    """A template as (is_slot, text) parts, parsed once so filling is a loop of appends."""
    parts = _SLOT.split(template)
    return tuple((i % 2 == 1, p) for i, p in enumerate(parts) if p)


_PARSED: dict[str, tuple[tuple[tuple[bool, str], ...], ...]] = {
    topic: tuple(_parse(t) for t in templates) for topic, templates in TOPICS.items()}


def template_slots() -> set[str]:
    """Every slot name the templates use (the tests check each has a source)."""
    return {p for ts in _PARSED.values() for t in ts for is_slot, p in t if is_slot}


class _Uniform:
    """Uniform [0, 1) draws from a seeded Generator, fetched in blocks (per-call numpy is slow)."""

    def __init__(self, rng: np.random.Generator, block: int = 2048) -> None:
        self._rng = rng
        self._block = block
        self._buf: list[float] = []
        self._i = 0

    def __call__(self) -> float:
        if self._i >= len(self._buf):
            self._buf = self._rng.random(self._block).tolist()
            self._i = 0
        self._i += 1
        return self._buf[self._i - 1]

    def choice(self, options: tuple[str, ...] | list[str]) -> str:
        return options[int(self() * len(options))]


@dataclass
class Persona:
    """Who a simulated user is; it decides the mixture and the wording of their messages."""

    topics: tuple[str, ...]
    topic_cdf: list[float]
    style: dict[str, str]
    favourites: dict[str, tuple[str, ...]]
    own: dict[str, tuple[str, ...]]
    greetings: tuple[str, ...]
    sign_offs: tuple[str, ...]
    catch_phrases: tuple[str, ...]
    p_greet: float
    p_sign_off: float
    p_catch: float
    p_loyal: float
    no_apostrophes: bool
    capitalise: bool
    punctuate: bool


def _pick(rng: np.random.Generator, pool: tuple[str, ...], lo: int, hi: int) -> tuple[str, ...]:
    n = int(rng.integers(lo, hi + 1))
    return tuple(pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False))


def make_persona(rng: np.random.Generator) -> Persona:
    """A random persona: 2-4 favourite topics (+ chat), favourites in every list, one style."""
    topics = tuple(TOPICS)
    chat = topics.index("chat")
    others = [i for i in range(len(topics)) if i != chat]
    favs = rng.choice(others, size=int(rng.integers(2, 5)), replace=False)
    weights = np.full(len(topics), 0.10 / (len(topics) - 1))
    weights[favs] += 0.72 * rng.dirichlet(np.full(len(favs), 2.0))
    weights[chat] += 0.18
    weights /= weights.sum()
    style = {slot: options[int(rng.integers(len(options)))] for slot, options in STYLE.items()}
    favourites = {slot: _pick(rng, pool, 2, 4) for slot, pool in CONTENT.items()}
    own = {
        "friend": _pick(rng, NAMES, 3, 6),
        "place": _pick(rng, PLACES, 3, 5),
        "team": _pick(rng, TEAMS, 1, 2),
        "game": _pick(rng, GAMES, 1, 3),
        "pet_name": _pick(rng, PET_NAMES, 1, 1),
    }
    return Persona(
        topics=topics,
        topic_cdf=np.cumsum(weights).tolist(),
        style=style,
        favourites=favourites,
        own=own,
        greetings=_pick(rng, GREETINGS, 1, 2),
        sign_offs=_pick(rng, SIGN_OFFS, 1, 2),
        catch_phrases=_pick(rng, CATCH_PHRASES, 1, 2),
        p_greet=float(rng.uniform(0.05, 0.45)),
        p_sign_off=float(rng.uniform(0.0, 0.35)),
        p_catch=float(rng.uniform(0.03, 0.25)),
        p_loyal=float(rng.uniform(0.7, 0.95)),
        no_apostrophes=bool(rng.random() < 0.25),
        capitalise=bool(rng.random() < 0.4),
        punctuate=bool(rng.random() < 0.5),
    )


def _fill(slot: str, persona: Persona, u: _Uniform) -> str:
    if slot in persona.own:
        return u.choice(persona.own[slot])
    if slot in STYLE:
        return persona.style[slot] if u() < 0.95 else u.choice(STYLE[slot])
    return u.choice(persona.favourites[slot]) if u() < persona.p_loyal else u.choice(CONTENT[slot])


def _message(persona: Persona, u: _Uniform) -> str:
    topic = persona.topics[min(bisect.bisect_right(persona.topic_cdf, u()), len(persona.topics) - 1)]
    parts = []
    if u() < persona.p_greet:
        greeting = u.choice(persona.greetings)
        parts.append(f"{greeting} {u.choice(persona.own['friend'])}," if u() < 0.5 else f"{greeting},")
    body = "".join(_fill(p, persona, u) if is_slot else p for is_slot, p in u.choice(_PARSED[topic]))
    tail = []
    if u() < persona.p_catch:
        tail.append(u.choice(persona.catch_phrases))
    if u() < persona.p_sign_off:
        tail.append(u.choice(persona.sign_offs))
    if tail and persona.punctuate and body[-1] not in "?!.":
        body += "."
    text = " ".join(parts + [body] + tail)
    if persona.no_apostrophes:
        text = text.replace("'", "")
    if persona.capitalise:
        text = text[:1].upper() + text[1:]
    return text


def synthetic_corpus(n_users: int = 300, seed: int = 0,
                     messages_per_user: tuple[int, int] = (20, 80)) -> Corpus:
    """The built-in corpus: `n_users` personas, each typing lo..hi (inclusive) chat messages.

    User i (named `user0000`, ...) depends only on (seed, i), so a smaller fleet is a prefix
    of a larger one with the same seed.
    """
    lo, hi = messages_per_user
    if n_users < 1:
        raise ValueError(f"n_users must be at least 1, got {n_users}")
    if not 1 <= lo <= hi:
        raise ValueError(f"messages_per_user must be (lo, hi) with 1 <= lo <= hi, got {messages_per_user}")
    users: dict[str, list[str]] = {}
    width = max(4, len(str(n_users - 1)))
    for i in range(n_users):
        rng = np.random.default_rng([seed, i])
        persona = make_persona(rng)
        u = _Uniform(rng)
        n = int(rng.integers(lo, hi + 1))
        users[f"user{i:0{width}d}"] = [_message(persona, u) for _ in range(n)]
    return Corpus(name=f"synthetic-keyboard-s{seed}-u{n_users}", users=users)
