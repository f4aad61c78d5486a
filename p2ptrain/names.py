"""Readable three-word peer names derived from a public key (adjective-colour-animal)."""
from __future__ import annotations

import hashlib

ADJECTIVES = """able agile alert amber bold brave bright brisk calm clever cosmic crisp curious daring
eager early fair fancy fast fierce gentle giant glad grand happy hardy humble jolly keen kind lively
lucky merry mighty modest nimble noble patient plucky polite proud quick quiet rapid ready regal
robust rustic shy silent sleek smart snowy solid spry steady stout sunny swift tidy tough vivid
wise witty young zesty""".split()
COLOURS = """amber aqua azure beige black blue bronze brown cerise coral cream crimson cyan denim ebony
emerald fawn fuchsia ginger gold green grey hazel indigo ivory jade khaki lemon lilac lime magenta
maroon mauve mint navy ochre olive onyx orange peach pearl pink plum purple quartz red rose ruby rust
sage salmon sand scarlet sepia silver slate tan teal topaz umber violet white wine""".split()
ANIMALS = """ant badger bat bear beaver bee bison boar bobcat camel cat cobra crab crane crow deer dingo
dog dolphin dove duck eagle eel elk falcon ferret finch fox frog gecko goat goose gopher hare hawk
heron horse ibis jackal jaguar koala lemur lion llama lynx mole moose moth newt otter owl panda
parrot pelican pony puma quail rabbit raven seal shark sheep sloth snail swan tiger toad trout turtle
walrus whale wolf wombat yak zebra""".split()


def readable_name(public_key: bytes) -> str:
    """``adjective-colour-animal``, the same for the same key on every machine."""
    h = hashlib.sha256(b"p2ptrain-name:" + public_key).digest()
    words = (ADJECTIVES, COLOURS, ANIMALS)
    return "-".join(w[int.from_bytes(h[2 * i:2 * i + 2], "big") % len(w)] for i, w in enumerate(words))
