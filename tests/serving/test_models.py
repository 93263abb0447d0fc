"""lmservice/serving/models.py: a request's model name resolved to a served entry, its task and languages
checked, before anything reaches the engine (no engine needed for resolving)."""

from __future__ import annotations

import pytest

from lmservice.engine.outputs import RequestRejectedError
from lmservice.model.card import Languages, ModelCard
from lmservice.serving.models import ModelEntry, ModelRegistry, UnknownModelError, tasks_of


def _registry() -> ModelRegistry:
    base = ModelEntry("base", None, ModelCard(), tasks_of(ModelCard(), False))
    models = ModelRegistry(engine=None, base=base)  # type: ignore[arg-type]  (resolving never calls it)
    cards = {
        "sentiment": ModelCard(task="classify", labels=["negative", "positive"]),
        "en-de": ModelCard(task="translate", prompt_template="en: {text}\nde:", languages=Languages(source="en", target="de")),
        "en-fr": ModelCard(task="translate", prompt_template="en: {text}\nfr:", languages=Languages(source="en", target="fr")),
    }
    models._entries.update({name: ModelEntry(name, "base", card, tasks_of(card, card.task == "classify"))
                            for name, card in cards.items()})
    return models


def test_a_name_resolves_to_its_entry_and_the_engine_sees_only_adapter_names():
    models = _registry()
    assert models.resolve("base", "generate").adapter is None
    assert models.resolve("sentiment", "classify").adapter == "sentiment"
    assert models.resolve(None, "classify").name == "sentiment"  # no name: the first able to do the task
    assert models.resolve("en-de", "generate").name == "en-de"  # a translator also generates
    assert models.num_adapters == 3


def test_unknown_names_and_tasks_a_model_cannot_do_are_refused():
    models = _registry()
    with pytest.raises(UnknownModelError) as unknown:
        models.resolve("nope", "generate")
    assert unknown.value.name == "nope" and isinstance(unknown.value, KeyError)
    with pytest.raises(RequestRejectedError, match="cannot do `generate`") as wrong_task:
        models.resolve("sentiment", "generate")
    assert wrong_task.value.param == "model"
    only_base = ModelRegistry(engine=None, base=ModelEntry("base", None, ModelCard(), ("generate",)))  # type: ignore[arg-type]
    with pytest.raises(RequestRejectedError, match="no served model can do `classify`"):
        only_base.resolve(None, "classify")


def test_translation_routing_by_languages():
    models = _registry()
    assert models.resolve_translation(None, "en", "fr").name == "en-fr"
    assert models.resolve_translation(None, None, "de").name == "en-de"
    assert models.resolve_translation("en-fr", "en", None).name == "en-fr"
    with pytest.raises(RequestRejectedError, match=r"translates en -> de, not en -> fr") as named:
        models.resolve_translation("en-de", "en", "fr")
    assert named.value.param == "target"
    with pytest.raises(RequestRejectedError, match=r"no model translates de -> en; available: en-de") as none:
        models.resolve_translation(None, "de", "en")
    assert none.value.param == "source"
