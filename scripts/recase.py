"""Deterministic "sentence case" for lowercase English story text (TinyStories train file); used by
scripts/make_default_models.sh.

    from recase import sentence_case
    sentence_case('one day, lily said, "mom, i\'m hungry!" she ran to the kitchen.')
    -> 'One day, Lily said, "Mom, I\'m hungry!" She ran to the kitchen.'

Only the case of letters changes: the output has exactly the same length and the same characters
up to case (``sentence_case(t).lower() == t.lower()`` for lowercase ``t``).

Rules, in order (each can be switched off for ablations, see ``sentence_case``'s keywords):
  starts   first letter of the text, of every line, after a sentence end (. ! ? plus optional
           closing quotes/brackets, then whitespace), and after an opening double quote
           (" or “ at the start of a line or after a space, ( [ : , ; or a dash).
           "..." / "…" and the abbreviations mr. mrs. ms. dr. st. do not end a sentence.
  tags     exception to "starts": after a quotation that ends in . ! ? and its closing quote, the
           next word stays lowercase when it is a speech verb ('"Wow!" said Tom.') or a pronoun
           followed by one ('"Hi!" she said.').
  i        the pronoun i and i'm i'll i've i'd (straight or curly apostrophe).
  names    a fixed list of 50 character names (NAMES below), learned from the lowercase train file
           itself: the most frequent words after "named", minus function words and words that often
           follow a determiner (common nouns/adjectives like "kitty", "teddy", "blue"); see
           ``learn_names``. Also the titles mr mrs ms dr and the word right after them ("Mr. Smith").
  proper   a fixed list of always-capitalised words (days, months but may/march, christmas, easter,
           halloween, santa, god; tv -> TV).
  family   mom mommy mama dad daddy papa grandma grandpa granny as a name (not after a determiner,
           a possessive pronoun or a possessive 's: "Mom said" but "her mom said", "lily's mom"; in
           "his mommy and daddy" the second word follows the first).

CLI:  python scripts/recase.py < lower.txt > cased.txt      (--tsv: only the first column of each line)
      python scripts/recase.py --learn-names TRAIN.txt      (prints the list NAMES was made from)
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

# learn_names("train_first5000_lowercased.txt", 50), frozen so the transform needs no data at run time.
NAMES = ["lily", "timmy", "tim", "lucy", "tom", "jack", "max", "jane", "sue", "bob", "sarah", "benny", "amy", "sally", "spot", "joe", "john", "daisy", "sam", "mia", "emma", "molly", "tweety", "ben", "fluffy", "mary", "pete", "andy", "jill", "billy", "jake", "anna", "mittens", "sophie", "polly", "rosie", "bobby", "alice", "fin", "emily", "bella", "grace", "fred", "remy", "alex", "sammy", "ducky", "susie", "jim", "nemo"]
TITLES = ("mr", "mrs", "ms", "dr")
# Always-capitalised English words (fixed, not learned): days, unambiguous months, holidays, a few nouns.
PROPER = tuple(["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "january", "february", "april", "june", "july", "august", "september", "october", "november", "december", "christmas", "easter", "halloween", "santa", "god"])
UPPER = {"tv": "TV"}
FAMILY = ("mom", "mommy", "mama", "dad", "daddy", "papa", "grandma", "grandpa", "granny")
SPEECH_VERBS = frozenset(
    ["said", "says", "say", "asked", "asks", "replied", "replies", "answered", "shouted", "shouts", "exclaimed", "cried", "yelled", "whispered", "called", "added", "laughed", "giggled", "explained", "agreed", "thought", "screamed", "squeaked", "barked", "chirped", "continued", "told", "begged", "suggested", "wondered", "sang", "meowed", "growled", "sighed"])
_PRONOUNS = frozenset(["he", "she", "they", "it", "we", "you", "i"])
_ABBREV = frozenset(("mr", "mrs", "ms", "dr", "st"))
_DETERMINERS = frozenset(
    ["a", "an", "the", "his", "her", "my", "your", "their", "our", "its", "this", "that", "these", "those", "some", "every", "any", "no", "whose"])

_L = r"[^\W\d_]"  # one letter (any script)
_LINE_START = re.compile(r"(?m)^[ \t\"“‘'(\[*_¡¿-]*(" + _L + ")")
_SENT_END = re.compile(
    r"(?P<stop>[.!?])(?P<close>[\"”’')\]]*)(?P<space>\s+)(?P<open>[\"“‘'(\[¡¿]*)(?P<letter>" + _L + ")")
_OPEN_QUOTE = re.compile(r"(?:^|(?<=[\s(\[:,;—–-]))[\"“][¡¿]?(" + _L + ")")
_PRONOUN_I = re.compile(r"(?<![\w'’])i(?=['’](?:m|ll|ve|d)\b|(?![\w'’]))")
_WORD = re.compile(r"[\w'’]+")


def _word_list_re(words) -> re.Pattern:
    return re.compile(r"(?<![\w'’])(" + "|".join(sorted(words, key=len, reverse=True)) + r")(?!\w)")


_NAMES_RE = _word_list_re([*NAMES, *TITLES])
_PROPER_RE = _word_list_re([*PROPER, *UPPER])
_FAMILY_RE = _word_list_re(FAMILY)
_AFTER_TITLE = re.compile(r"(?<![\w'’])(?:mr|mrs|ms|dr)\.? +(" + _L + ")")


def _prev_word(text: str, pos: int) -> str:
    """The word that ends right before text[pos] (skipping spaces), lowercased, '' if none."""
    m = re.search(r"([\w'’]+)\W*$", text[max(0, pos - 40):pos])
    return m.group(1).lower() if m else ""


def _is_dialogue_tag(text: str, m: re.Match) -> bool:
    """'"Wow!" said Tom' / '"Wow!" she said': a speech verb first, or a pronoun and then one."""
    if not any(q in m.group("close") for q in "\"”'’"):
        return False
    nxt = [w.lower() for w in _WORD.findall(text[m.start("letter"):m.start("letter") + 40])[:2]] + ["", ""]
    return nxt[0] in SPEECH_VERBS or (nxt[0] in _PRONOUNS and nxt[1] in SPEECH_VERBS)


def sentence_case(text: str, *, starts: bool = True, tags: bool = True, i: bool = True,
                  names: bool = True, proper: bool = True, family: bool = True) -> str:
    """Recase lowercase story text; only letter case changes (same length, same letters)."""
    up: set[int] = set()
    down: set[int] = set()  # dialogue-tag words that the start rule must leave alone
    if starts:
        up.update(m.start(1) for m in _LINE_START.finditer(text))
        for m in _SENT_END.finditer(text):
            s = m.start("stop")
            if m.group("stop") == "." and (text[s - 1:s] == "." or text[s + 1:s + 2] == "."):
                continue  # ellipsis
            if m.group("stop") == "." and _prev_word(text, s) in _ABBREV:
                continue
            if tags and _is_dialogue_tag(text, m):
                down.add(m.start("letter"))
                continue
            up.add(m.start("letter"))
        up.update(m.start(1) for m in _OPEN_QUOTE.finditer(text))
        up -= down
    if i:
        up.update(m.start() for m in _PRONOUN_I.finditer(text))
    if names:
        up.update(m.start(1) for m in _NAMES_RE.finditer(text))
        up.update(m.start(1) for m in _AFTER_TITLE.finditer(text))
    if proper:
        for m in _PROPER_RE.finditer(text):
            up.update(range(m.start(1), m.end(1)) if m.group(1) in UPPER else [m.start(1)])
    if family:
        last_end, last_up = -1, False
        for m in _FAMILY_RE.finditer(text):
            between = text[last_end:m.start(1)] if last_end >= 0 else ""
            if re.fullmatch(r"\s+(?:and|or)\s+", between):
                cap = last_up  # "his mommy and daddy": the determiner covers both
            else:
                prev = _prev_word(text, m.start(1))
                cap = prev not in _DETERMINERS and not prev.endswith(("'s", "’s"))
            if cap:
                up.add(m.start(1))
            last_end, last_up = m.end(1), cap
    if not up:
        return text
    chars = list(text)
    for p in up:
        chars[p] = chars[p].upper() if len(chars[p].upper()) == 1 else chars[p]  # keep length (ß)
    return "".join(chars)


def learn_names(text: str, n: int = 50, min_named: int = 3, max_det_ratio: float = 0.15) -> list[str]:
    """Character names from lowercase story text alone: words after "named", most frequent first.

    Drops function words and words that follow a determiner in more than `max_det_ratio` of their
    occurrences (common nouns/adjectives used as names: "kitty", "teddy", "blue", "mark").
    """
    stop = _DETERMINERS | {"mr", "mrs", "ms", "dr", "after", "by", "him", "it", "them", "me", "you"}
    named = collections.Counter(re.findall(r"\bnamed ([a-z]+)\b", text))
    words = re.findall(r"[a-z]+", text)
    total = collections.Counter(words)
    det = collections.Counter(w for p, w in zip(words, words[1:], strict=False) if p in _DETERMINERS)
    out = [w for w, c in named.most_common() if c >= min_named and w not in stop
           and det[w] / total[w] <= max_det_ratio]
    return out[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="input files (default: stdin); output goes to stdout")
    ap.add_argument("--learn-names", metavar="TRAIN", help="print the names learned from TRAIN and exit")
    ap.add_argument("-n", type=int, default=50, help="how many names --learn-names prints")
    ap.add_argument("--tsv", action="store_true", help="recase only the first tab-separated column of each line")
    a = ap.parse_args(argv)
    if a.learn_names:
        with open(a.learn_names, encoding="utf-8") as f:
            print(" ".join(learn_names(f.read(), a.n)))
        return 0
    for name in a.files or ["-"]:
        src = sys.stdin if name == "-" else open(name, encoding="utf-8")  # noqa: SIM115 (stdin is not closed)
        if a.tsv:
            for line in src:
                text, tab, rest = line.partition("\t")
                sys.stdout.write(sentence_case(text) + tab + rest)
        else:
            sys.stdout.write(sentence_case(src.read()))
        if src is not sys.stdin:
            src.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
