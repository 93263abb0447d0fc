"""The data preparation of the shipped models (scripts/recase.py, scripts/sst2_sentences.py): what each rule does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from recase import sentence_case  # noqa: E402
from sst2_sentences import is_whole_sentence  # noqa: E402


def test_sentence_case_restores_starts_names_and_i_and_changes_nothing_else():
    text = 'one day, lily said, "mom, i\'m hungry!" she ran to the kitchen. "wow!" said tom.\nher mom smiled.'
    cased = sentence_case(text)
    assert cased == ('One day, Lily said, "Mom, I\'m hungry!" She ran to the kitchen. "Wow!" said Tom.\n'
                     "Her mom smiled.")
    assert cased.lower() == text  # only the case of letters changes


def test_sentence_case_leaves_ellipses_and_titles_alone():
    assert sentence_case("mr. smith waited... and waited.") == "Mr. Smith waited... and waited."


def test_tsv_mode_recases_only_the_text_column():
    out = subprocess.run([sys.executable, str(SCRIPTS / "recase.py"), "--tsv"], input="it 's a bore .\t0\n",
                         capture_output=True, text=True, check=True).stdout
    assert out == "It 's a bore .\t0\n"


def test_whole_sentence_rule():
    assert is_whole_sentence("a charming and often affecting journey .")
    assert is_whole_sentence("it 's a bore !")
    assert not is_whole_sentence("a charming and often affecting journey")  # no sentence end
    assert not is_whole_sentence("'s crap on a leash .")  # the right-hand suffix of a sentence
    assert not is_whole_sentence(", it has considerable charm .")
    assert not is_whole_sentence("")
