"""LoRA adapters over real HTTP (issue 34): a server process loads the adapters of
ML_SERVICE_ADAPTERS_DIR, lists each as `<model>:<adapter>` on /v1/models, serves it by the OpenAI
`model` and by /forward's `adapter`, adds and removes adapters at run time (POST and DELETE
/admin/adapters), keeps them across an engine-process crash and a reload, refuses bad ones with the
reason, and never answers one adapter's request from another's cache entry. peft with plain
transformers reproduces its greedy text."""

from __future__ import annotations

import json
import os
import shutil
import signal

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ml_service.settings import Settings
from tests.helpers import CHECKPOINT, running_server, wait_for
from tests.lib.inference.test_adapters import make_adapter
from tests.system.test_engine_restart import workers

pytestmark = pytest.mark.slow
TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "Москва — столица"
GREEDY = {"temperature": 0, "max_new_tokens": 16, "min_new_tokens": 0, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two adapters in the served directory, one to add at run time, and two bad ones."""
    root = tmp_path_factory.mktemp("lora")
    served = root / "served"
    made = {
        "a": make_adapter(served / "a", 1),
        "b": make_adapter(served / "b", 2, rank=8, targets=("c_attn",)),
        "c": make_adapter(root / "extra" / "c", 3, rank=2, targets=("c_fc", "c_proj")),
        "served": served,
    }
    corrupt = shutil.copytree(made["a"], root / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    other = shutil.copytree(made["a"], root / "other-base")
    (other / "training_card.json").write_text(json.dumps({"base": {"sha256": "0" * 64}}))
    made.update(corrupt=corrupt, other=other)
    return made


@pytest.fixture(scope="module")
def server(made):
    env = {"ML_SERVICE_ADAPTERS_DIR": str(made["served"]), "ML_SERVICE_ADMIN_TOKEN": TOKEN}
    with running_server(["--checkpoint", str(CHECKPOINT)], env=env) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def base(server) -> str:
    return httpx.get(f"{server.url}/metadata").json()["model_id"]


def forward(server, text: str, adapter: str | None = None, **extra) -> httpx.Response:
    body = {"text": text, **GREEDY, **({"adapter": adapter} if adapter else {}), **extra}
    return httpx.post(f"{server.url}/forward", json=body, timeout=60)


def sdk_text(client, model: str, cache: bool = True, answered: str | None = None) -> str:
    answer = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=GREEDY["max_new_tokens"],
        temperature=0,
        extra_body={"min_tokens": 0, "repetition_penalty": 1.0, "cache": cache},
    )
    assert answer.model == (answered or model)  # the id it was asked by (or the canonical one)
    return answer.choices[0].text


def test_each_adapter_is_a_model_the_sdk_chooses_with_forwards_answer(server, client, base):
    cards = {c.id: c for c in client.models.list().data}
    for name in ("a", "b"):
        card = httpx.get(f"{server.url}/v1/models/{base}:{name}").json()
        assert card["parent"] == base and card["root"] == base and f"{base}:{name}" in cards
    assert httpx.get(f"{server.url}/v1/models/{base}").json()["parent"] is None
    texts = {}
    for name in (None, "a", "b"):
        r = forward(server, PROMPT, name)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == (base if name is None else f"{base}:{name}")
        texts[name] = r.json()["text"]
        assert sdk_text(client, base if name is None else f"{base}:{name}") == texts[name]
    assert len(set(texts.values())) > 1  # an adapter changes the model's answer
    # an adapter's bare name, as vLLM lists them: the answer names it `<model>:<adapter>`
    assert sdk_text(client, "a", answered=f"{base}:a") == texts["a"]
    meta = httpx.get(f"{server.url}/metadata").json()
    assert [a["model"] for a in meta["adapters"]] == [f"{base}:a", f"{base}:b"]
    # the access log line and the metrics name the adapter
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'ml_service_adapter_requests_total{adapter="a"}' in metrics
    lines = [json.loads(x) for x in server.log.read_text().splitlines() if x.startswith("{")]
    assert {line.get("adapter") for line in lines if line["route"] == "/forward"} >= {"a", "b"}


@pytest.mark.parametrize("name", ["a", "b"])
def test_peft_with_plain_transformers_gives_the_services_greedy_tokens(server, made, name):
    tok = AutoTokenizer.from_pretrained(str(CHECKPOINT))
    plain = AutoModelForCausalLM.from_pretrained(str(CHECKPOINT))
    model = PeftModel.from_pretrained(plain, made[name]).eval()
    eos = model.config.eos_token_id
    ids = [eos, *tok(PROMPT)["input_ids"]]  # the service's prompt starts a document too
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=GREEDY["max_new_tokens"],
            min_new_tokens=0,
            repetition_penalty=1.0,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    new = out[0, len(ids) :].tolist()
    new = new[: new.index(eos)] if eos in new else new
    answer = forward(server, PROMPT, name).json()
    assert answer["usage"]["completion_tokens"] == len(new)
    assert answer["text"] == tok.decode(new)


def test_unknown_adapters_are_404_model_not_found(server, client, base):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model=f"{base}:nope", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
    r = forward(server, PROMPT, "nope")
    assert r.status_code == 404 and r.json()["errors"][0]["loc"] == ["adapter"], r.text
    batch = {"texts": [PROMPT, "Кошка"], "adapter": "nope"}
    assert httpx.post(f"{server.url}/forward_batch", json=batch).status_code == 404
    form = httpx.post(f"{server.url}/forward", data={"text": PROMPT, "adapter": "b"}, timeout=60)
    assert form.status_code == 200 and form.json()["model"] == f"{base}:b"
    assert forward(server, PROMPT, adapter=7).status_code == 400  # strict: a string


def test_runtime_adapters_are_added_survive_a_crash_and_a_reload_and_are_removed(
    server, client, base, made
):
    body = {"name": "c", "path": str(made["c"])}
    assert httpx.post(f"{server.url}/admin/adapters", json=body).status_code == 401
    r = httpx.post(f"{server.url}/admin/adapters", json=body, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == f"{base}:c" and r.json()["added"] and r.json()["rank"] == 2
    assert f"{base}:c" in [card.id for card in client.models.list().data]
    listed = httpx.get(f"{server.url}/admin/adapters", headers=ADMIN).json()["adapters"]
    assert [(a["name"], a["added"]) for a in listed] == [("a", False), ("b", False), ("c", True)]
    before = sdk_text(client, f"{base}:c")
    assert before == forward(server, PROMPT, "c").json()["text"]

    # the engine process dies: the one that replaces it loads the run-time adapter too
    wait_for(lambda: len(workers(server.pid)) == 2, "an engine process and a standby")
    os.kill(workers(server.pid)[0], signal.SIGKILL)
    wait_for(lambda: forward(server, "Кошка", "c").status_code == 200, "c served again", 60)
    assert sdk_text(client, f"{base}:c", cache=False) == before
    # a reload builds a new engine: it loads the run-time adapter as well
    assert httpx.post(f"{server.url}/admin/reload", headers=ADMIN, timeout=120).status_code == 200
    assert forward(server, PROMPT, "c", cache=False).json()["text"] == before

    r = httpx.delete(f"{server.url}/admin/adapters/c", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"name": "c", "removed": True, "waiting_for": 0}
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model=f"{base}:c", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found"
    assert forward(server, PROMPT, "c").status_code == 404
    assert httpx.delete(f"{server.url}/admin/adapters/c", headers=ADMIN).status_code == 404


def test_bad_adapters_are_400_with_the_reason_and_the_service_keeps_serving(server, made):
    def add(name, path) -> httpx.Response:
        body = {"name": name, "path": str(path)}
        return httpx.post(f"{server.url}/admin/adapters", json=body, headers=ADMIN, timeout=60)

    for name, path, says in [
        ("corrupt", made["corrupt"], "not readable"),
        ("other", made["other"], "sha256"),
        ("missing", made["served"] / "missing", "has no adapter_config.json"),
        ("../up", made["a"], "adapter name"),
    ]:
        r = add(name, path)
        assert r.status_code == 400, r.text
        assert says in r.json()["errors"][0]["msg"], r.text
    assert add("a", made["a"]).status_code == 200  # an idle one of the same name is replaced
    extra = {"name": "x", "path": str(made["a"]), "rank": 4}
    r = httpx.post(f"{server.url}/admin/adapters", json=extra, headers=ADMIN)
    assert r.status_code == 400  # strict body: no unknown fields
    names = [
        a["name"]
        for a in httpx.get(f"{server.url}/admin/adapters", headers=ADMIN).json()["adapters"]
    ]
    assert sorted(names) == ["a", "b"]
    assert forward(server, PROMPT, "b").status_code == 200


def test_the_response_cache_never_answers_one_adapter_with_another(server):
    prompt = "Он открыл дверь и"
    first = {}
    for name in (None, "a", "b"):
        r = forward(server, prompt, name)
        assert r.headers["x-cache"] == "miss", name  # no entry of the others is taken
        first[name] = r.json()["text"]
    for name in (None, "a", "b"):
        r = forward(server, prompt, name)
        assert r.headers["x-cache"] == "hit" and r.json()["text"] == first[name], name


def test_a_badly_named_adapter_directory_stops_the_start(tmp_path):
    (tmp_path / "bad name").mkdir()
    (tmp_path / "bad name" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="adapter name 'bad name'"):
        Settings(adapters_dir=tmp_path)
    with pytest.raises(ValueError, match="MAX_ADAPTER_MB"):
        Settings(adapters_dir=tmp_path, max_adapter_mb=0)


def test_a_removal_waits_for_the_requests_running_with_the_adapter(server):
    long = {"text": PROMPT, "adapter": "b", "stream": True, **GREEDY}
    long.update(max_new_tokens=250, min_new_tokens=250)  # (still running at the DELETE)
    events = []
    with httpx.stream("POST", f"{server.url}/forward", json=long, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("event: "):
                continue
            events.append(line.removeprefix("event: "))
            if len(events) == 2:  # generating with b: remove it now
                d = httpx.delete(f"{server.url}/admin/adapters/b", headers=ADMIN)
                assert d.json() == {"name": "b", "removed": False, "waiting_for": 1}, d.text
                assert forward(server, "Кошка", "b").status_code == 404  # new ones: refused
    assert events[-1] == "done" and "error" not in events  # the running one finished with it

    def unloaded() -> bool:
        listed = httpx.get(f"{server.url}/admin/adapters", headers=ADMIN).json()["adapters"]
        return "b" not in [a["name"] for a in listed]

    wait_for(unloaded, "b unloaded after its last request")
