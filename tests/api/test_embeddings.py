"""/v1/embeddings with the official openai client: vectors equal transformers' mean-pooled GPT2Model, float
and base64 agree, the same input gives the same vector alone or in a batch, bad input is a 4xx."""

from __future__ import annotations

import openai
import pytest
import torch
from transformers import AutoTokenizer, GPT2Model


@pytest.fixture(scope="module")
def reference(model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["base"])
    model = GPT2Model.from_pretrained(model_dirs["base"]).eval()

    def embed(text: str) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(torch.tensor([tokenizer.encode(text)])).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)

    return embed


def test_openai_client_embeddings_match_transformers(client, reference):
    texts = ["a dog runs in the park", "Zwei Männer", "x"]
    # the client asks for base64 unless told otherwise, and decodes it
    batch = client.embeddings.create(model="base", input=texts)
    assert [d.index for d in batch.data] == [0, 1, 2] and batch.model == "base"
    for text, item in zip(texts, batch.data, strict=True):
        assert torch.allclose(torch.tensor(item.embedding), reference(text), atol=1e-4)
    floats = client.embeddings.create(model="base", input=texts, encoding_format="float")
    for a, b in zip(batch.data, floats.data, strict=True):
        assert torch.allclose(torch.tensor(a.embedding), torch.tensor(b.embedding), atol=1e-6)
    alone = client.embeddings.create(model="base", input=texts[1], encoding_format="float")
    assert alone.data[0].embedding == floats.data[1].embedding  # the same vector alone or in a batch
    assert batch.usage.prompt_tokens == batch.usage.total_tokens > 0


def test_token_id_input_and_an_adapter(client, http, reference):
    ids = http.post("/tokenize", json={"prompt": "a dog runs"}).json()["tokens"]
    by_ids = client.embeddings.create(model="base", input=ids, encoding_format="float").data[0].embedding
    assert torch.allclose(torch.tensor(by_ids), reference("a dog runs"), atol=1e-4)
    adapter = client.embeddings.create(model="tr", input="a dog runs", encoding_format="float").data[0].embedding
    assert not torch.allclose(torch.tensor(adapter), torch.tensor(by_ids), atol=1e-3)  # LoRA changes the states


@pytest.mark.parametrize("body, error, param", [
    ({"model": "base", "input": "x", "dimensions": 8}, openai.BadRequestError, "dimensions"),
    ({"model": "cls", "input": "x"}, openai.BadRequestError, "model"),  # a classifier does not embed
    ({"model": "nope", "input": "x"}, openai.NotFoundError, "model"),
    ({"model": "base", "input": [[1, 2], [10**6]]}, openai.BadRequestError, "input"),
    ({"model": "base", "input": [1, True]}, openai.UnprocessableEntityError, "input"),  # token ids: integers only
    ({"model": "base", "input": [[1, 2.0]]}, openai.UnprocessableEntityError, "input"),
    ({"model": "base", "input": ""}, openai.BadRequestError, "input"),
    ({"model": "base", "input": []}, openai.BadRequestError, "input"),
])
def test_bad_embedding_requests(client, body, error, param):
    with pytest.raises(error) as e:
        client.embeddings.create(**body)
    assert e.value.body["param"] == param
