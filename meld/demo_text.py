"""Phrase generator for the demo dataset: Friends-style lines whose wording hints at their emotion.

Each emotion has its own templates; slots ({name}, {thing}, ...) are filled from small word lists.
The hint is deliberately imperfect, so that audio adds information beyond the text: a share of the
non-neutral lines get a neutral or ambiguous phrasing ("What?", "Okay."), and some get a phrasing shared
with a neighbouring emotion ("Oh my God!" is joy or surprise). Text uses the real Unicode punctuation
of the post-2020 MELD CSVs: ’ in contractions, … and —, plus numbers.
"""

from __future__ import annotations

import re

import numpy as np

# Speaker -> is female. The main six speak most lines; guests appear now and then.
MAIN_CAST: dict[str, bool] = {
    "Ross": False, "Chandler": False, "Joey": False, "Rachel": True, "Monica": True, "Phoebe": True,
}
GUESTS: dict[str, bool] = {
    "Janice": True, "Gunther": False, "Mike": False, "Carol": True, "Emily": True, "Richard": False,
    "Mr. Geller": False, "Mrs. Geller": True, "Tag": False, "Ursula": True, "Frank": False, "Estelle": True,
}
CAST: dict[str, bool] = {**MAIN_CAST, **GUESTS}

SLOTS: dict[str, tuple[str, ...]] = {
    "name": ("Ross", "Rachel", "Monica", "Chandler", "Joey", "Phoebe", "Janice", "Gunther", "Ben", "Emma"),
    "thing": ("the couch", "my sandwich", "the duck", "the chick", "the ring", "my sweater", "the foosball table",
              "the TV", "the keys", "the turkey", "the lasagna", "my hat", "the cheesecake", "the fish"),
    "place": ("Central Perk", "the coffee house", "the museum", "Monica’s", "the airport",
              "the hospital", "the apartment", "Joey’s", "the restaurant", "the hallway"),
    "city": ("London", "Paris", "Vegas", "Chicago", "Tulsa", "Yemen", "Barbados", "Montauk"),
    "number": ("2", "3", "5", "7", "10", "12", "20", "25", "30", "40", "50", "100"),
    "time": ("8 o’clock", "7:30", "noon", "9:15", "midnight", "6:45", "ten"),
    "food": ("pizza", "lasagna", "cheesecake", "turkey", "coffee", "muffins", "trifle", "fries"),
}

TEMPLATES: dict[str, tuple[str, ...]] = {
    "neutral": (
        "So, are we still going to {place} at {time}?", "I’ll get {thing}.", "Hey {name}, what’s up?",
        "Yeah, I think it’s in the kitchen.", "Okay, so I’ll see you at {place}.",
        "It’s about {number} blocks from here.", "I was just talking to {name} about {thing}.",
        "Do you want some {food}?", "Well, I guess we could try {place}.", "The movie starts at {time}.",
        "Can you pass me {thing}?", "I think {name} is still at {place}.", "We need, like, {number} chairs.",
        "Um, I have to work tomorrow.", "So what did {name} say?", "I’ll call you later.",
        "Let’s just order {food}.", "It’s on the table, next to {thing}.", "I’m gonna go take a shower.",
        "Is {name} coming or not?", "Did you put {thing} back?", "He said he’d be here by {time}.",
    ),
    "joy": (
        "Oh, I love it! This is the best {food} ever!", "We’re going to {city}! Yay!",
        "That’s so great, {name}! I’m so happy for you!", "Ha! I knew it — I totally knew it!",
        "This is amazing, thank you so much!", "You guys are the best!", "I got the job! I got the job!",
        "Aw, that’s so sweet.", "Woo-hoo! {number} bucks, baby!", "Oh, this is gonna be so much fun!",
        "I can’t stop smiling… this is perfect.", "Best. Day. Ever.", "Yay! Free {food} for everybody!",
        "Oh, you’re gonna love {city}, it’s wonderful!", "Ha ha, that’s hilarious!",
    ),
    "surprise_positive": (
        "Oh my God! You’re getting married?!", "No way! You got tickets to {city}?!",
        "Wait — you did this for me?", "Are you serious? {number} dollars?!", "Whoa! When did this happen?",
        "Get out! You and {name}?!", "Really? You’re pregnant?!", "Shut up! That’s incredible!",
    ),
    "surprise_negative": (
        "What?! You lost {thing}?", "Wait, you slept with {name}?!", "What do you mean it’s gone?!",
        "Are you kidding me? Since when?", "Huh?! You’re moving to {city}?", "Hold on — he’s married?!",
        "What the hell? Who did this?", "You’re quitting?! Why?",
    ),
    "anger": (
        "I can’t believe you did that to me!", "Get out! Get out of my apartment!",
        "Are you kidding me?! That was MY {food}!", "Don’t you dare touch {thing} again!",
        "You ate my {food}? My {food}?!", "That’s it, I’ve had it with you!", "Shut up, {name}! Just shut up!",
        "How could you? We were on a break!", "Stop it! I’m so sick of this!", "Oh, you’re unbelievable!",
        "I waited {number} minutes — {number} minutes!", "Why would you tell {name}?!",
        "Unbelievable. Un-be-lievable!", "You know what? Forget it!",
    ),
    "sadness": (
        "I just… I really thought he loved me.", "I’m sorry, I just miss her so much.",
        "It’s over. We broke up.", "Nobody came to my party…", "I don’t wanna be alone anymore.",
        "I guess I’ll never see {name} again.", "He’s gone, and he’s not coming back.",
        "I’m such a loser.", "It’s been {number} days and she still hasn’t called.",
        "I lost my job today.", "Everything’s falling apart…", "I really wish things were different.",
        "Maybe I’m just not good enough.",
    ),
    "disgust": (
        "Ugh, that’s disgusting.", "Eww! What is that smell?", "Gross! There’s hair in {food}!",
        "Oh, that is so nasty.", "Ugh, I can’t even look at it.", "Eww, {name}, put it away!",
        "That’s revolting — who eats {food} like that?", "Yuck! Get it off me!", "Ugh, he’s such a pig.",
        "Oh God, I think I’m gonna throw up.", "That’s just wrong. Eww.",
    ),
    "fear": (
        "I’m scared, what was that?", "Oh no, oh no, oh no…", "Somebody’s in the apartment!",
        "Please don’t hurt me!", "What if he finds out? He’ll kill me!", "I can’t do this, I’m terrified.",
        "Did you hear that? There’s someone at the door!", "Help! {name}, help!",
        "I think I’m gonna faint…", "What if something happens to {name}?", "Oh God, we’re gonna die!",
        "Don’t leave me here alone!",
    ),
}

# Lines any emotion may wear: a neutral or ambiguous phrasing hides the emotion from the text.
AMBIGUOUS: tuple[str, ...] = (
    "What?", "Okay.", "Oh.", "Really?", "Hey!", "{name}!", "Yeah.", "Oh, {name}…", "Well…", "Uh-huh.",
    "No.", "Wait.", "Hi.", "Right.", "Are you sure?", "Hmm.", "Seriously?", "I know.", "Oh, okay.",
)

# Lines two neighbouring emotions share, so the text alone confuses them now and then.
SHARED: dict[frozenset[str], tuple[str, ...]] = {
    frozenset({"joy", "surprise"}): ("Oh my God!", "Oh my God, that’s amazing!", "No way!"),
    frozenset({"anger", "disgust"}): ("What is wrong with you?", "Ugh, I can’t believe him."),
    frozenset({"fear", "surprise"}): ("What was that?!", "Oh my God, what happened?"),
    frozenset({"sadness", "fear"}): ("I don’t know what to do…", "What am I gonna do?"),
    frozenset({"anger", "sadness"}): ("How could he do this to me?", "I can’t believe it’s over."),
}

# Shares of non-neutral lines that get an ambiguous/neutral phrasing, and a shared one.
HIDDEN_SHARE = 0.35
SHARED_SHARE = 0.12


def _fill(rng: np.random.Generator, template: str) -> str:
    return template.format(**{slot: words[rng.integers(len(words))] for slot, words in SLOTS.items()})


def _pick(rng: np.random.Generator, lines: tuple[str, ...]) -> str:
    return _fill(rng, lines[rng.integers(len(lines))])


def phrase(rng: np.random.Generator, emotion: str, sentiment: str) -> str:
    """One utterance for ``emotion`` (surprise reads differently when its sentiment is negative)."""
    if emotion == "neutral":
        return _pick(rng, AMBIGUOUS if rng.random() < 0.2 else TEMPLATES["neutral"])
    draw = rng.random()
    if draw < HIDDEN_SHARE:
        return _pick(rng, AMBIGUOUS + TEMPLATES["neutral"])
    shared = tuple(line for pair, lines in SHARED.items() if emotion in pair for line in lines)
    if draw < HIDDEN_SHARE + SHARED_SHARE:
        return _pick(rng, shared)
    key = f"surprise_{sentiment}" if emotion == "surprise" else emotion
    return _pick(rng, TEMPLATES[key])


def long_phrase(rng: np.random.Generator, emotion: str, sentiment: str, parts: int = 4) -> str:
    """A rambling turn for the long-tail clips: several lines of the same emotion in one utterance."""
    lines: list[str] = []
    for _ in range(10 * parts):  # draws until ``parts`` different lines (the pools hold far more)
        line = phrase(rng, emotion, sentiment)
        if line not in lines:
            lines.append(line)
        if len(lines) == parts:
            break
    return " ".join(lines)


def syllables(text: str) -> int:
    """Rough spoken syllable count: vowel groups per word (at least one), a number read as two."""
    words = re.findall(r"[a-z’']+|\d+", text.lower())
    return max(1, sum(2 if w.isdigit() else max(1, len(re.findall("[aeiouy]+", w))) for w in words))
