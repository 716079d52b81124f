"""Reading-comprehension data shaped like CoQA: a short story, then question/answer turns whose
answers are short spans of the story (1–4 words). Used by the quick-start; pure and deterministic.

- `generate(n, split, seed)`: stories built from templates and random facts. The "train" and
  "held_out" splits draw people, cities and pet names from disjoint pools, so a held-out story
  never repeats a training story's facts: the model has to read, not remember.
- `read_coqa(path)`: the same `Story` objects from a real CoQA JSON file
  (`{"data": [{"story", "questions": [{"input_text"}], "answers": [{"input_text"}]}]}`).
- `chat_row(story)`: the conversational fine-tuning format (system, story + first question, …).
- `preference_rows(story, rng)`: DPO pairs (preferred = the short gold answer, non-preferred = a
  wrong span of the same story or a rambling answer; both kinds in every story with ≥ 2 turns).

    python -c "from tunehouse.data.coqa import generate, chat_row; print(chat_row(generate(1)[0]))"
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PROMPT = "Answer the question about the story in a few words."
SPLITS = ("train", "held_out")


@dataclass(frozen=True)
class Story:
    text: str
    turns: tuple[tuple[str, str], ...]  # (question, short answer), in conversation order


# -- facts ------------------------------------------------------------------------------------
# People, cities and pet names are split between train and held-out stories (see `_pool`);
# the other facts are shared, so only their combinations differ.
NAMES = ["Ada", "Bruno", "Chen", "Dalia", "Emeka", "Freya", "Goran", "Hana", "Ivan", "Jamila", "Kofi",
         "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tove", "Umar", "Vera",
         "Wei", "Ximena", "Yusuf", "Zara", "Aiko", "Bjorn", "Carmen", "Dmitri", "Elif", "Farid",
         "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luis", "Mira", "Nils", "Olga", "Pablo", "Rania",
         "Stefan", "Tara", "Ulla", "Viktor", "Wanda", "Yara", "Zeno"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quebec", "Tbilisi", "Perth", "Dakar",
          "Krakow", "Bergen", "Cusco", "Porto", "Seville", "Tallinn", "Accra", "Hobart", "Bilbao",
          "Lyon", "Turku", "Mombasa", "Cork", "Riga", "Quito", "Malaga", "Graz", "Utrecht", "Kyoto",
          "Dundee", "Salta", "Aarhus", "Split"]
PET_NAMES = ["Biscuit", "Pepper", "Mango", "Ziggy", "Noodle", "Clover", "Pickle", "Olive", "Rocket",
             "Waffle", "Pebble", "Juniper", "Tofu", "Muffin", "Comet", "Sprout"]
JOBS = ["baker", "nurse", "pilot", "teacher", "carpenter", "chemist", "fisherman", "librarian",
        "painter", "plumber", "gardener", "tailor", "dentist", "farmer", "journalist", "mechanic",
        "architect", "florist"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink",
           "brown", "silver"]
THINGS = ["kite", "bicycle", "umbrella", "lantern", "violin", "backpack", "notebook", "scarf",
          "teapot", "clock", "map", "key", "hat", "suitcase", "camera", "guitar", "blanket", "vase"]
SPOTS = ["the attic", "the garden", "the old barn", "the train station", "the library",
         "the market", "the beach", "the cellar", "the park"]
ANIMALS = ["dog", "cat", "parrot", "goat", "rabbit", "turtle", "horse", "hamster", "duck", "pony"]
FOODS = ["apple pie", "lentil soup", "pancakes", "rice", "carrots", "cheese", "fish stew",
         "noodles", "plum cake", "porridge", "corn bread", "mushroom pie"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
VEHICLES = ["bus", "train", "ferry", "tram", "boat"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
TIMES = ["6:15", "7:30", "8:45", "9:00", "10:20", "11:40", "12:30", "2:10", "3:50", "4:25", "5:05"]
RELATIVES = ["sister", "brother", "cousin", "aunt", "uncle", "grandmother", "neighbour"]


@dataclass(frozen=True)
class Template:
    sentences: tuple[str, ...]
    questions: tuple[tuple[tuple[str, ...], str], ...]  # (phrasings, answer), in story order


TEMPLATES = (
    Template(  # a found object
        ("{name} is a {job} who lives in {city}.",
         "On {day}, {name} found a {colour} {thing} near {spot}.",
         "Inside it there were {number} old letters.",
         "At {time}, {name} gave it to {name2}, a {job2} from next door."),
        ((("What does {name} do for a living?", "What is {name}'s job?", "What is {name}'s occupation?"), "{job}"),
         (("Where does {name} live?", "In which city does {name} live?", "What city is {name} from?"), "{city}"),
         (("On which day did {name} find something?", "When did {name} find it?", "What day was it?"), "{day}"),
         (("What did {name} find?", "What was found?", "What object did {name} discover?"), "{colour} {thing}"),
         (("What colour was the {thing}?", "What colour was it?", "Which colour was the {thing}?"), "{colour}"),
         (("Where was the {thing} found?", "Where did {name} find the {thing}?", "Where was it?"), "{spot}"),
         (("How many letters were inside?", "How many old letters were there?",
           "How many letters did it hold?"), "{number}"),
         (("Who did {name} give it to?", "Who received the {thing}?", "Who got it?"), "{name2}"),
         (("At what time did {name} give it away?", "When did {name2} get it?",
           "What time was it handed over?"), "{time}"),
         (("What is {name2}'s job?", "What does {name2} do?", "What is the neighbour's occupation?"), "{job2}"))),
    Template(  # a pet
        ("{name} has a {colour} {animal} called {pet}.",
         "{pet} is {age} years old and loves {food}.",
         "Every {day}, {name} and {pet} walk to {spot} in {city}.",
         "They always come home at {time}."),
        ((("What animal does {name} have?", "What kind of pet does {name} own?",
           "What pet does {name} have?"), "{animal}"),
         (("What is the {animal} called?", "What is the pet's name?", "What is {name}'s {animal} named?"), "{pet}"),
         (("What colour is {pet}?", "What colour is the {animal}?", "Which colour is {name}'s pet?"), "{colour}"),
         (("How old is {pet}?", "How many years old is the {animal}?", "What is {pet}'s age?"), "{age}"),
         (("What does {pet} love to eat?", "What food does the {animal} love?",
           "What is {pet}'s favourite food?"), "{food}"),
         (("On which day do they walk?", "When do {name} and {pet} go for a walk?", "Which day is the walk?"), "{day}"),
         (("Where do they walk to?", "Where do {name} and {pet} go?", "What place do they walk to?"), "{spot}"),
         (("In which city do they live?", "What city is it?", "Where is {spot}?"), "{city}"),
         (("When do they come home?", "At what time do they return?", "What time do they get home?"), "{time}"))),
    Template(  # a trip
        ("{name} and {name2} took the {vehicle} from {city} to {city2} on {day}.",
         "The trip took {number} hours.",
         "They arrived at {time} and ate {food} at a small {colour} cafe.",
         "{name2} is {name}'s {relative} and works as a {job2}."),
        ((("Who travelled with {name}?", "Who went with {name}?", "Who was {name}'s travel companion?"), "{name2}"),
         (("How did they travel?", "What did they take?", "Which transport did they use?"), "{vehicle}"),
         (("Where did they start?", "Which city did they leave from?", "Where did the trip begin?"), "{city}"),
         (("Where were they going?", "What was their destination?", "Which city did they go to?"), "{city2}"),
         (("On which day did they travel?", "When did they go?", "What day was the trip?"), "{day}"),
         (("How many hours did the trip take?", "How long was the trip?",
           "How many hours was the journey?"), "{number}"),
         (("When did they arrive?", "At what time did they arrive?", "What time did they get there?"), "{time}"),
         (("What did they eat?", "What food did they have?", "What did they eat at the cafe?"), "{food}"),
         (("What colour was the cafe?", "What colour was it?", "Which colour was the cafe painted?"), "{colour}"),
         (("How is {name2} related to {name}?", "Who is {name2} to {name}?",
           "What relation is {name2}?"), "{relative}"),
         (("What is {name2}'s job?", "What does {name2} do?", "What does {name2} work as?"), "{job2}"))),
    Template(  # a shop
        ("{name} runs a small shop in {city} that sells {thing}s.",
         "The shop opens at {time} and is closed on {day}.",
         "Last week {number} customers bought a {colour} {thing}.",
         "The shop is next to {spot}, and {name}'s {relative} {name2} helps on weekends."),
        ((("What does {name}'s shop sell?", "What does the shop sell?",
           "What can you buy in {name}'s shop?"), "{thing}s"),
         (("Where is the shop?", "In which city is the shop?", "What city is the shop in?"), "{city}"),
         (("When does the shop open?", "At what time does it open?", "What time does the shop open?"), "{time}"),
         (("On which day is it closed?", "When is the shop closed?", "What day does the shop close?"), "{day}"),
         (("How many customers bought a {colour} {thing}?", "How many customers were there last week?",
           "How many people bought one?"), "{number}"),
         (("What colour were the {thing}s they bought?", "What colour was the {thing}?",
           "Which colour did customers buy?"), "{colour}"),
         (("What is the shop next to?", "What is beside the shop?", "Where is the shop located?"), "{spot}"),
         (("Who helps on weekends?", "Who helps {name}?", "Who works there on weekends?"), "{name2}"),
         (("How is {name2} related to {name}?", "Who is {name2} to {name}?",
           "What relation is {name2}?"), "{relative}"))),
    Template(  # a birthday
        ("{name} turned {age} on {day}.",
         "{number} friends came to the party in {city}, and they ate {food}.",
         "{name2}, who is a {job2}, brought a {colour} {thing} as a present.",
         "The party ended at {time}."),
        ((("How old did {name} turn?", "How old is {name} now?", "What age did {name} reach?"), "{age}"),
         (("On which day was the birthday?", "When was {name}'s birthday?", "What day was the party?"), "{day}"),
         (("How many friends came?", "How many guests were there?", "How many friends came to the party?"), "{number}"),
         (("Where was the party?", "In which city was the party?", "What city was the party in?"), "{city}"),
         (("What did they eat?", "What food was served?", "What did the guests eat?"), "{food}"),
         (("Who brought a present?", "Who gave {name} a gift?", "Who brought the {thing}?"), "{name2}"),
         (("What is {name2}'s job?", "What does {name2} do?", "What is {name2}'s occupation?"), "{job2}"),
         (("What was the present?", "What did {name2} bring?", "What was the gift?"), "{colour} {thing}"),
         (("When did the party end?", "At what time did it end?", "What time did the party finish?"), "{time}"))),
)

RAMBLING = (
    "Based on the story, I think the answer is {answer}, because the story mentions it.",
    "That's a great question! Let me look at the story again. It seems the answer might be {answer}.",
    "The story talks about many things, so it is hard to say, but it could be {answer} or something else.",
    "I'm not completely sure, but after reading the story carefully I would guess {answer}.",
    "In the story there are several details; the one you are asking about is {answer}, I believe.",
)


def _pool(values: list[str], split: str) -> list[str]:
    """Every fourth value is held out; the rest are for training (disjoint by construction)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    held_out = split == "held_out"
    return [v for i, v in enumerate(values) if (i % 4 == 0) == held_out]


def _facts(rng: random.Random, split: str) -> dict[str, str]:
    name, name2 = rng.sample(_pool(NAMES, split), 2)
    city, city2 = rng.sample(_pool(CITIES, split), 2)
    job, job2 = rng.sample(JOBS, 2)
    return {"name": name, "name2": name2, "city": city, "city2": city2, "job": job, "job2": job2,
            "pet": rng.choice(_pool(PET_NAMES, split)), "colour": rng.choice(COLOURS),
            "thing": rng.choice(THINGS), "spot": rng.choice(SPOTS), "animal": rng.choice(ANIMALS),
            "food": rng.choice(FOODS), "day": rng.choice(DAYS), "vehicle": rng.choice(VEHICLES),
            "number": rng.choice(NUMBERS), "time": rng.choice(TIMES), "age": str(rng.randint(3, 80)),
            "relative": rng.choice(RELATIVES)}


def generate(n: int, split: str = "train", seed: int = 0, turns: int = 4) -> list[Story]:
    """`n` stories, each with `turns` questions (a random subset of its template's, in story
    order, one random phrasing each). The same (n, split, seed, turns) always gives the same
    stories; the two splits share no person, city or pet name."""
    rng = random.Random(f"{split}:{seed}")
    out = []
    for i in range(n):
        template = TEMPLATES[i % len(TEMPLATES)]
        facts = _facts(rng, split)
        text = " ".join(_capitalised(s.format(**facts)) for s in template.sentences)
        picked = sorted(rng.sample(range(len(template.questions)), min(turns, len(template.questions))))
        qa = tuple((rng.choice(template.questions[k][0]).format(**facts), template.questions[k][1].format(**facts))
                   for k in picked)
        out.append(Story(text, qa))
    return out


def read_coqa(path: str | Path) -> list[Story]:
    """Stories of a CoQA JSON file (`data[].story`, `questions[].input_text`,
    `answers[].input_text`, paired by position or by `turn_id` when present)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    out = []
    for item in data:
        questions = sorted(item["questions"], key=lambda q: q.get("turn_id", 0))
        answers = sorted(item["answers"], key=lambda a: a.get("turn_id", 0))
        qa = tuple((q["input_text"].strip(), a["input_text"].strip()) for q, a in zip(questions, answers)
                   if q["input_text"].strip() and a["input_text"].strip())
        if qa:
            out.append(Story(item["story"].strip(), qa))
    return out


def _capitalised(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def chat_row(story: Story) -> dict:
    """The conversational format: system prompt, story + first question, then one user turn per
    later question; each assistant turn is the short gold answer."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for i, (question, answer) in enumerate(story.turns):
        messages.append({"role": "user", "content": f"{story.text}\n\n{question}" if i == 0 else question})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def preference_rows(story: Story, rng: random.Random) -> list[dict]:
    """One DPO pair per turn, prompted with the story and that question alone. Non-preferred
    answers alternate between a wrong span (another turn's answer from the same story) and a
    rambling sentence around the right answer, starting at a random kind; a story with a single
    turn has no wrong span to offer and gets rambling only."""
    answers = [a for _, a in story.turns]
    rows, rambling = [], rng.random() < 0.5
    for question, answer in story.turns:
        wrong = [a for a in answers if a.lower() != answer.lower()]
        if rambling or not wrong:
            rejected = rng.choice(RAMBLING).format(answer=answer)
        else:
            rejected = rng.choice(wrong)
        rambling = not rambling
        rows.append({"input": {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                            {"role": "user", "content": f"{story.text}\n\n{question}"}]},
                     "preferred_output": [{"role": "assistant", "content": answer}],
                     "non_preferred_output": [{"role": "assistant", "content": rejected}]})
    return rows


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
