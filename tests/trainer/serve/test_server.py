"""The OpenAI-compatible server: continuous batching keeps greedy tokens, bounds answer 4xx.

Servers run in this process (uvicorn on a thread, a free loopback port) over tiny random models
with SmolLM2's real tokenizer, in float32. Where a test needs requests to overlap, the stepper is
slowed down by a fixed sleep per macro step (the decoding itself is unchanged).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from helpers import tiny_model_dir
from launcher import free_port
from transformers import AutoTokenizer, LlamaForCausalLM

from hamburger.decode import base_generate_batch, generate
from hamburger.decode.continuous import ContinuousBatch
from hamburger.decode.slots import SlotBatch
from hamburger.model import HAMburgerConfig, HAMburgerModel, save_model
from trainer.serve.app import create_app
from trainer.serve.config import ServeConfig
from trainer.serve.loader import load_for_serving
from trainer.serve.scheduler import Scheduler

PROMPTS = [
    "Count from 1 to 9.",
    "Write a haiku about bread and butter on a cold morning.",
    "Hi",
    "What is the capital of France? Answer in one word, then explain why in three sentences.",
    "List five prime numbers.",
    "def reverse(s):",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    base_dir = tiny_model_dir(root / "base", seed=0, layers=2)
    base = LlamaForCausalLM.from_pretrained(str(base_dir))
    model = HAMburgerModel(base, HAMburgerConfig(embedder_head_dim=16, micro_layers=1, max_segment_len=4))
    torch.manual_seed(7)
    with torch.no_grad():  # a stop head that sometimes continues: segments of 1..4 tokens
        model.embedder.o_proj.weight.normal_(0, 0.05)
        for layer in model.stop_head.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.5)
    ham = root / "ham"
    save_model(model, str(ham), tokenizer=AutoTokenizer.from_pretrained(str(base_dir)))
    eos = base.config.eos_token_id
    (ham / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "max_new_tokens": 32, "confidence": 0.5})
    )
    return {"ham": ham, "base": base_dir}


class Recording:
    """Records every macro step's rows (by prompt) and joins that happen while rows are running;
    mixed into the eager batch and the slot batch alike."""

    def __init__(self, *a, delay_s: float = 0.0, **kw):
        super().__init__(*a, **kw)
        self.delay_s, self.steps, self.joins_while_running = delay_s, [], 0

    def join(self, seqs):
        self.joins_while_running += bool(seqs) and len(self.rows) > 0
        super().join(seqs)

    def step(self):
        self.steps.append((time.monotonic(), [tuple(s.prompt_ids) for s in self.rows]))
        time.sleep(self.delay_s)
        return super().step()


class RecordingBatch(Recording, ContinuousBatch):
    """The eager batch (`serve --decode eager`)."""


class RecordingSlots(Recording, SlotBatch):
    """The slot batch on the static decoder (`serve --decode static` / graphed)."""


class Server:
    """A server on the slot engine by default (what `serve` runs on CPU: decode auto = static),
    so every behaviour below is tested against it; decode="eager" for the dynamic-cache batch."""

    def __init__(self, folder: Path, delay_s: float = 0.0, decode: str = "static", **overrides):
        import uvicorn

        self.cfg = ServeConfig(model=str(folder), port=free_port(), decode=decode, **overrides)
        self.engine = load_for_serving(self.cfg.model, name="tiny")
        pad = self.engine.tokenizer.pad_token_id or 0
        if decode == "eager":
            self.batch = RecordingBatch(self.engine.stepper, self.engine.eos, pad, delay_s=delay_s)
        else:  # what `serve --decode static` runs
            model, c = self.engine.stepper.parameters_of, self.cfg
            self.batch = RecordingSlots(
                model, c.max_batch, c.max_prompt_tokens, c.max_tokens_cap, self.engine.eos, delay_s=delay_s
            )
        self.scheduler = Scheduler(self.batch, self.cfg.max_batch, self.cfg.max_queue).start()
        app = create_app(self.engine, self.cfg, self.scheduler)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.cfg.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.cfg.port}"

    def post(self, path: str, body: dict, **kw) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=kw.pop("timeout", 60), **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.scheduler.close()


@pytest.fixture
def server_factory():
    made = []

    def make(folder, **kw) -> Server:
        made.append(Server(folder, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def reference(engine, prompt: str, max_new: int, confidence: float) -> tuple[str, int, int]:
    ids = engine.tokenizer(prompt)["input_ids"]
    res = generate(engine.stepper.model, ids, max_new, confidence, engine.eos)
    return engine.tokenizer.decode(res.tokens, skip_special_tokens=True), len(res.tokens), res.macro_steps


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_greedy_output_equals_generate_with_requests_arriving_mid_run(folders, server_factory, decode):
    srv = server_factory(folders["ham"], delay_s=0.01, max_batch=4, decode=decode, max_tokens_cap=64)
    jobs = [(p, 8 + 5 * i, (0.3, 0.5, 0.7, 0.9)[i % 4]) for i, p in enumerate(PROMPTS)]
    answers: dict[int, dict] = {}

    def ask(i: int) -> None:
        p, n, c = jobs[i]
        r = srv.post("/v1/completions", {"prompt": p, "max_tokens": n, "confidence": c})
        answers[i] = r.json() if r.status_code == 200 else {"status": r.status_code, "body": r.text}

    threads = []
    for i in range(len(jobs)):  # staggered: each arrives while earlier ones are decoding
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        time.sleep(0.06)
    for t in threads:
        t.join(60)
    assert srv.batch.joins_while_running >= 2, (answers, srv.batch.steps)
    assert max(len(rows) for _, rows in srv.batch.steps) >= 3
    for i, (p, n, c) in enumerate(jobs):
        text, tokens, steps = reference(srv.engine, p, n, c)
        a = answers[i]
        assert a["choices"][0]["text"] == text, (i, a)
        assert a["usage"]["completion_tokens"] == tokens and a["hamburger"]["macro_steps"] == steps
        assert a["hamburger"]["tokens_per_macro_step"] == pytest.approx(tokens / steps, abs=1e-4)
    multi = [a for a in answers.values() if a["hamburger"]["tokens_per_macro_step"] > 1]
    assert multi, "the test model must emit multi-token segments"


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_base_server_batches_the_same_way(folders, server_factory, decode):
    srv = server_factory(folders["base"], delay_s=0.01, max_batch=3, decode=decode, max_tokens_cap=64)
    answers: dict[int, dict] = {}

    def ask(i: int) -> None:
        answers[i] = srv.post("/v1/completions", {"prompt": PROMPTS[i], "max_tokens": 6 + 3 * i}).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.04)
    for t in threads:
        t.join(60)
    tok, lm = srv.engine.tokenizer, srv.engine.stepper.lm
    for i in range(5):
        ids = tok(PROMPTS[i])["input_ids"]
        ref = base_generate_batch(lm, [ids], 6 + 3 * i, srv.engine.eos)[0]
        assert answers[i]["choices"][0]["text"] == tok.decode(ref.tokens, skip_special_tokens=True)
        assert answers[i]["hamburger"]["tokens_per_macro_step"] == 1.0
    assert srv.batch.joins_while_running >= 1
    r = srv.post("/v1/completions", {"prompt": "x", "confidence": 0.5})
    assert r.status_code == 400 and "base model" in r.json()["error"]["message"]


def test_streaming_gives_the_same_text_and_stop_strings_cut_both(folders, server_factory):
    srv = server_factory(folders["ham"])
    for body in (
        {"prompt": PROMPTS[1], "max_tokens": 30, "confidence": 0.5},
        {"prompt": PROMPTS[0], "max_tokens": 30, "confidence": 0.3},
    ):
        plain = srv.post("/v1/completions", body).json()["choices"][0]
        full = plain["text"]
        cut = full[len(full) // 2 : len(full) // 2 + 3]  # a stop string from the middle of the output
        for extra in ({}, {"stop": [cut]}):
            ref = srv.post("/v1/completions", {**body, **extra}).json()["choices"][0]
            r = srv.post("/v1/completions", {**body, **extra, "stream": True}, stream=True)
            events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert "".join(c["choices"][0]["text"] for c in chunks) == ref["text"]
            assert chunks[-1]["choices"][0]["finish_reason"] == ref["finish_reason"]
            if extra:
                assert ref["text"] == full[: full.index(cut)] and ref["finish_reason"] == "stop"


def test_openai_client_completion_chat_and_stream(folders, server_factory):
    openai = pytest.importorskip("openai")
    srv = server_factory(folders["ham"])
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    c = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    text, tokens, _ = reference(srv.engine, PROMPTS[0], 12, 0.5)
    assert c.choices[0].text == text and c.usage.completion_tokens == tokens
    messages = [{"role": "user", "content": PROMPTS[3]}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    ids = srv.engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    res = generate(srv.engine.stepper.model, list(ids["input_ids"]), 10, 0.5, srv.engine.eos)
    assert chat.choices[0].message.content == srv.engine.tokenizer.decode(
        res.tokens, skip_special_tokens=True
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == len(res.tokens)
    assert chat.model_extra["hamburger"]["macro_steps"] >= 1
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for ev in stream:
        parts += [ch.delta.content or "" for ch in ev.choices]
        usage = ev.usage or usage
    assert "".join(parts) == chat.choices[0].message.content and usage.completion_tokens == len(res.tokens)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=0.7)


@pytest.fixture(scope="module")
def capped_server(folders):
    srv = Server(folders["ham"], max_tokens_cap=400)
    yield srv
    srv.close()


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"prompt": "x", "max_tokens": 401}, 400, "max_tokens: 401 is over this server's cap of 400"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens: must be an integer >= 1"),
        ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens: must be an integer"),
        ({"prompt": None}, 400, "prompt: required"),
        ({"max_tokens": 3}, 400, "prompt: required"),
        ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
        ({"prompt": [1, 10**9]}, 400, "prompt: token ids must lie in"),
        ({"prompt": "x", "confidence": 0}, 400, "confidence: must be a number in (0, 1]"),
        ({"prompt": "x", "confidence": 1.5}, 400, "confidence: must be a number in (0, 1]"),
        ({"prompt": "x", "temperature": 1}, 400, "temperature: only 0"),
        ({"prompt": "x", "n": 2}, 400, "n: only 1 is supported"),
        ({"prompt": "x", "stop": [""]}, 400, "stop: a non-empty string"),
        ({"prompt": "x", "bogus": 1}, 400, "bogus: unknown field"),
        ({"prompt": "x", "stream": "yes"}, 400, "stream: must be true or false"),
        ({"prompt": "x", "model": "other"}, 404, "'other' is not served here"),
        ({"prompt": "x", "timeout": -1}, 400, "timeout: seconds in"),
        ({"prompt": "x " * 600, "max_tokens": 400}, 400, "exceeds the model's context of 512"),
        ([1, 2], 400, "the body must be a JSON object"),
    ],
)
def test_bad_requests_are_4xx_with_the_field_named(capped_server, body, status, fragment):
    r = capped_server.post("/v1/completions", body)
    assert r.status_code == status and fragment in r.json()["error"]["message"], r.text


def test_malformed_and_oversized_bodies(folders, server_factory):
    srv = server_factory(folders["ham"])
    r = requests.post(srv.url + "/v1/completions", data=b"{not json", timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = requests.post(srv.url + "/v1/completions", data=b"x" * (2 << 20), timeout=10)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
    r = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]})
    assert r.status_code == 400 and "messages[0].content" in r.json()["error"]["message"]
    assert requests.get(srv.url + "/health", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize(
    "path, raw, fragment",
    [
        ("/v1/completions", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
        ("/v1/chat/completions", b'{"messages": ' + b"[" * 40 + b"]" * 40 + b"}", "nested too deeply"),
        ("/v1/completions", b'{"prompt": "hi \\ud800 there"}', "prompt: not valid Unicode"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
            "messages[0].content: not valid Unicode",
        ),
        ("/v1/completions", b'{"prompt": "hi", "stop": ["\\ud800"]}', "stop[0]: not valid Unicode"),
        ("/v1/completions", b'{"prompt": "\xff\xfe"}', "not valid JSON"),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
        ("/v1/completions", b"", "not valid JSON"),
        (
            "/v1/chat/completions",
            b'{"messages": {"role": "user", "content": "hi"}}',
            "messages: required, a non-empty list",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [["user", "hi"]]}',
            "messages[0]: an object with a string role",
        ),
        ("/v1/completions", b'{"prompt": [[1, 2]]}', "prompt: a string, a list of one string"),
    ],
)
def test_malformed_bodies_get_a_json_400_naming_what_is_wrong_and_one_log_line(
    capped_server, capsys, path, raw, fragment
):
    capsys.readouterr()
    r = requests.post(
        capped_server.url + path, data=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text[:300]
    assert fragment in r.json()["error"]["message"]
    assert "Traceback" not in capsys.readouterr().err


def test_an_unforeseen_error_is_a_json_500_and_one_log_line(folders, server_factory, capsys):
    srv = server_factory(folders["ham"])
    real = srv.engine.tokenizer.__class__.__call__

    def broken(self, *a, **kw):
        raise TypeError("simulated tokenizer bug")

    srv.engine.tokenizer.__class__.__call__ = broken
    try:
        capsys.readouterr()
        r = srv.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    finally:
        srv.engine.tokenizer.__class__.__call__ = real
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "internal error (TypeError: simulated tokenizer bug)" in r.json()["error"]["message"]
    out = capsys.readouterr()
    assert "[serve] error: POST /v1/completions: TypeError: simulated tokenizer bug" in out.out
    assert "Traceback" not in out.err
    assert srv.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200


def _slow_request(srv: Server, prompt: str, out: dict, key: str, **extra) -> threading.Thread:
    def go():
        r = srv.post("/v1/completions", {"prompt": prompt, "max_tokens": 300, **extra})
        out[key] = (r.status_code, r.json())

    t = threading.Thread(target=go)
    t.start()
    return t


def _wait_running(srv: Server, n: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while srv.scheduler.stats()["running"] + srv.scheduler.stats()["waiting"] < n:
        assert time.monotonic() < end, srv.scheduler.stats()
        time.sleep(0.01)


def test_queue_full_is_429_and_a_deadline_frees_the_slot_within_one_macro_step(folders, server_factory):
    srv = server_factory(folders["ham"], delay_s=0.05, max_batch=1, max_queue=1)
    out: dict = {}
    a = _slow_request(srv, PROMPTS[0], out, "a", timeout=1.0)  # runs, then passes its deadline
    _wait_running(srv, 1)
    b = _slow_request(srv, PROMPTS[1], out, "b", max_tokens=4)  # waits for a's slot
    _wait_running(srv, 2)
    r = srv.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
    a.join(30)
    b.join(30)
    assert out["a"][0] == 504 and "deadline of 1 s" in out["a"][1]["error"]["message"]
    assert out["b"][0] == 200 and out["b"][1]["usage"]["completion_tokens"] >= 1
    first_b = _assert_handover(srv, PROMPTS[0], PROMPTS[1])
    a_ids = tuple(srv.engine.tokenizer(PROMPTS[0])["input_ids"])
    a_times = [t for t, rows in srv.batch.steps if a_ids in rows]
    assert a_times[-1] - a_times[0] < 1.0 + 0.2 and first_b > 0  # freed within a step of its deadline


def test_disconnected_client_frees_its_slot_within_one_macro_step(folders, server_factory, capsys):
    srv = server_factory(folders["ham"], delay_s=0.05, max_batch=1, max_queue=4)
    out: dict = {}
    body = {"prompt": PROMPTS[2], "max_tokens": 300, "stream": True}
    r = requests.post(srv.url + "/v1/completions", json=body, stream=True, timeout=30)
    lines = r.iter_lines()
    next(lines), next(lines)  # a streaming client that reads a little, then hangs up
    b = _slow_request(srv, PROMPTS[4], out, "b", max_tokens=3)
    _wait_running(srv, 2)
    r.close()
    gone = time.monotonic()
    b.join(30)
    assert out["b"][0] == 200
    first_b = _assert_handover(srv, PROMPTS[2], PROMPTS[4])
    assert srv.batch.steps[first_b][0] - gone < 1.5, "the slot was not freed promptly"
    # a non-streaming client that gives up (read timeout) frees its slot too
    with pytest.raises(requests.exceptions.ReadTimeout):
        srv.post("/v1/completions", {"prompt": PROMPTS[5], "max_tokens": 300}, timeout=0.5)
    end = time.monotonic() + 3
    while srv.scheduler.stats()["running"] and time.monotonic() < end:
        time.sleep(0.05)
    assert srv.scheduler.stats()["running"] == 0
    out = capsys.readouterr()
    assert "[serve] client disconnected from /v1/completions; its request was cancelled" in out.out
    assert "Traceback" not in out.err + out.out


def _assert_handover(srv: Server, first: str, second: str) -> int:
    """The step after `first`'s last step already runs `second` (it was waiting): the freed slot
    was refilled at the next macro-step boundary. Returns the index of `second`'s first step."""
    ids = {p: tuple(srv.engine.tokenizer(p)["input_ids"]) for p in (first, second)}
    steps = [rows for _, rows in srv.batch.steps]
    last_a = max(i for i, rows in enumerate(steps) if ids[first] in rows)
    first_b = min(i for i, rows in enumerate(steps) if ids[second] in rows)
    assert first_b == last_a + 1, [len(r) for r in steps[last_a - 1 : first_b + 1]]
    return first_b


# ---------------------------------------------------------------------------- the MLflow pyfunc
@pytest.fixture(scope="module")
def pyfunc_model(folders, tmp_path_factory):
    import mlflow.pyfunc

    from trainer.export.pyfunc import pyfunc_spec

    path = tmp_path_factory.mktemp("pyfunc") / "model"
    mlflow.pyfunc.save_model(str(path), **pyfunc_spec(folders["ham"]))
    return path


def test_pyfunc_is_models_from_code_with_a_signature(pyfunc_model):
    import yaml

    assert not list(pyfunc_model.rglob("*.pkl")), "the model must not be a pickled object"
    flavor = yaml.safe_load((pyfunc_model / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc_model.py")
    sig = yaml.safe_load((pyfunc_model / "MLmodel").read_text())["signature"]
    assert [c["name"] for c in json.loads(sig["inputs"])] == ["prompt", "max_new_tokens", "confidence"]


def test_pyfunc_decodes_rows_as_one_batch_with_defaults_for_omitted_fields(folders, pyfunc_model):
    import mlflow.pyfunc
    import pandas as pd

    from trainer.serve.loader import HAMburgerGenerator

    model = mlflow.pyfunc.load_model(str(pyfunc_model))
    rows = [
        {"prompt": PROMPTS[0], "max_new_tokens": 9, "confidence": 0.3},
        {"prompt": PROMPTS[1]},  # both optional fields omitted: the defaults, never NaN
        {"prompt": PROMPTS[2], "confidence": 0.7},
        {"prompt": PROMPTS[3], "max_new_tokens": 5},
    ]
    out = model.predict(pd.DataFrame(rows))
    gen = HAMburgerGenerator(folders["ham"])
    for row, (_, got) in zip(rows, out.iterrows(), strict=True):
        ref = gen.generate(row["prompt"], row.get("max_new_tokens", 32), row.get("confidence", 0.5))
        assert (got["text"], got["tokens"], got["macro_steps"]) == (
            ref.text,
            len(ref.tokens),
            ref.macro_steps,
        )


@pytest.mark.parametrize(
    "given",
    [
        "int columns",
        "dict of columns",
        "list of row dicts",
    ],
)
def test_pyfunc_from_python_accepts_what_its_docstring_says(pyfunc_model, given):
    """mlflow.pyfunc.load_model(...).predict with integer max_new_tokens (as pandas makes them),
    a dict of columns or a list of row dicts: each row decodes its own length."""
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(str(pyfunc_model))
    inputs = {
        "int columns": pd.DataFrame({"prompt": ["Hi", "Hello"], "max_new_tokens": [3, 4]}),
        "dict of columns": {"prompt": ["Hi", "Hello"], "max_new_tokens": [3, 4]},
        "list of row dicts": [
            {"prompt": "Hi", "max_new_tokens": 3},
            {"prompt": "Hello", "max_new_tokens": 4},
        ],
    }[given]
    assert model.predict(inputs)["tokens"].tolist() == [3, 4]  # random tiny model: no EOS this early


@pytest.mark.parametrize(
    "records, fragment",
    [
        ([{"prompt": None, "max_new_tokens": 3}], "row 0: prompt must be a non-empty string, got None"),
        ([{"prompt": "a"}, {"max_new_tokens": 3}], "row 1: prompt must be a non-empty string"),
        (
            [{"prompt": "a", "max_new_tokens": 2.5}],
            "row 0: max_new_tokens must be an integer in [1, 1024], got 2.5",
        ),
        ([{"prompt": "a", "max_new_tokens": 0}], "row 0: max_new_tokens must be an integer"),
        ([{"prompt": "a", "max_new_tokens": 10**9}], "row 0: max_new_tokens must be an integer in [1, 1024]"),
        (
            [{"prompt": "a"}, {"prompt": "b", "confidence": 1.5}],
            "row 1: confidence must be a number in (0, 1]",
        ),
        ([{"prompt": "a", "confidence": 0}], "row 0: confidence must be a number in (0, 1]"),
    ],
)
def test_pyfunc_rest_input_is_validated_naming_row_and_field(pyfunc_model, records, fragment):
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    model = _loaded(pyfunc_model)
    body = json.dumps({"dataframe_records": records})
    with pytest.raises(MlflowException) as e:  # what `mlflow models serve` runs for POST /invocations
        scoring_server.invocations(body, "application/json", model, model.metadata.get_input_schema())
    assert e.value.get_http_status_code() == 400 and fragment in e.value.message


def test_pyfunc_rest_rows_omitting_optional_fields_get_defaults(pyfunc_model):
    from mlflow.pyfunc import scoring_server

    model = _loaded(pyfunc_model)
    records = [{"prompt": "a", "max_new_tokens": 3}, {"prompt": "b"}, {"prompt": "c", "confidence": 0.9}]
    body = json.dumps({"dataframe_records": records, "params": {"max_new_tokens": 4}})
    r = scoring_server.invocations(body, "application/json", model, model.metadata.get_input_schema())
    assert r.status == 200, r.response
    rows = json.loads(r.response)["predictions"]
    assert [row["tokens"] for row in rows] == [3, 4, 4]  # random tiny model: no EOS this early


_LOADED: dict = {}


def _loaded(path):
    """The pyfunc loaded once per module (loading runs trainer/export/pyfunc_model.py)."""
    import mlflow.pyfunc

    if str(path) not in _LOADED:
        _LOADED[str(path)] = mlflow.pyfunc.load_model(str(path))
    return _LOADED[str(path)]


@pytest.mark.distributed
def test_launch_serve_cli_serves_an_mlflow_model_folder(pyfunc_model, tmp_path):
    """`python -m trainer.serve.app` (what `./launch.sh serve` runs) on a logged MLflow model: the
    HAMburger folder is found among its artifacts; /health and a completion answer."""
    import subprocess
    import sys

    from launcher import ROOT, env

    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.serve", str(pyfunc_model), "--port", str(port), "--max-batch", "2"],
        cwd=ROOT,
        env={**env(), "OMP_NUM_THREADS": "2"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url, end, health = f"http://127.0.0.1:{port}", time.monotonic() + 120, None
        while time.monotonic() < end and proc.poll() is None and health is None:
            try:
                health = requests.get(url + "/health", timeout=5).json()
            except requests.RequestException:
                time.sleep(0.3)
        assert health is not None, (tmp_path / "serve.log").read_text()[-3000:]
        assert health["kind"] == "hamburger" and health["max_batch"] == 2
        r = requests.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 5}, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 5 and r["model"] == health["model"]
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_a_failing_model_step_answers_500_and_the_server_carries_on(folders, server_factory):
    srv = server_factory(folders["ham"])
    real_step = srv.batch.step

    def broken():
        raise RuntimeError("simulated out-of-memory")

    srv.batch.step = broken
    r = srv.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4})
    assert (
        r.status_code == 500
        and "decoding failed: RuntimeError: simulated out-of-memory" in r.json()["error"]["message"]
    )
    srv.batch.step = real_step
    r = srv.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def _metrics(srv) -> dict[str, float]:
    r = requests.get(srv.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_prometheus_metrics_count_what_the_responses_say(folders, server_factory):
    """GET /metrics: requests by how they ended, tokens and macro steps equal to the responses'
    own usage and hamburger stats, one latency observation per request, an idle batch after."""
    srv = server_factory(folders["ham"], max_batch=2)
    answers = [
        srv.post("/v1/completions", {"prompt": p, "max_tokens": 6, "confidence": 0.5}).json()
        for p in PROMPTS[:3]
    ]
    late = srv.post("/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 30, "timeout": 1e-6})
    assert late.status_code == 504
    m = _metrics(srv)
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    steps = sum(a["hamburger"]["macro_steps"] for a in answers)
    assert (
        m['hamburger_requests_total{finish_reason="length"}']
        + m.get('hamburger_requests_total{finish_reason="stop"}', 0)
        == 3
    )
    assert m['hamburger_requests_total{finish_reason="deadline"}'] == 1
    assert m["hamburger_generated_tokens_total"] >= tokens  # + what the late request got before its deadline
    assert m["hamburger_request_macro_steps_total"] >= steps
    assert m["hamburger_requests_running"] == 0 and m["hamburger_requests_waiting"] == 0
    assert m["hamburger_slot_occupancy"] == 0 and m["hamburger_batch_macro_steps_total"] >= 1
    assert m["hamburger_request_latency_seconds_count"] == 4
    assert m['hamburger_request_latency_seconds_bucket{le="+Inf"}'] == 4
    assert m["hamburger_time_to_first_token_seconds_count"] >= 3  # the late one may end before a token
    assert m["hamburger_inter_token_latency_seconds_count"] == 3
    assert m["hamburger_tokens_per_macro_step"] > 0
    assert m["hamburger_batch_micro_calls_total"] >= tokens - steps  # one row at a time: L - 1 per segment


def test_load_generates_through_the_static_decoder_with_the_reference_tokens(folders):
    """load().generate decodes with static shapes by default (CUDA graphs on a GPU): the same
    tokens, segments and macro steps as the eager reference loop."""
    from trainer.serve.loader import HAMburgerGenerator

    fast, slow = HAMburgerGenerator(folders["ham"]), HAMburgerGenerator(folders["ham"], decode="eager")
    assert fast.decode == "auto"
    for prompt, n, c in ((PROMPTS[0], 12, 0.5), (PROMPTS[2], 20, 0.3), (PROMPTS[3], 7, 0.9)):
        a, b = fast.generate(prompt, n, c), slow.generate(prompt, n, c)
        ref = generate(slow.model, slow.encode(prompt), n, c, slow.eos)
        assert (a.tokens, a.seg_lens, a.macro_steps, a.text) == (b.tokens, b.seg_lens, b.macro_steps, b.text)
        assert (a.tokens, a.seg_lens) == (ref.tokens, ref.seg_lens)
    with pytest.raises(ValueError, match="decode must be one of"):
        HAMburgerGenerator(folders["ham"], decode="fast")


def test_static_slots_refuse_a_prompt_longer_than_a_slot_holds(folders, server_factory):
    srv = server_factory(folders["ham"], decode="static", max_prompt_tokens=4, max_tokens_cap=16)
    r = srv.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 4})
    assert r.status_code == 400 and "--max-prompt-tokens" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"
    ok = srv.post("/v1/completions", {"prompt": "a", "max_tokens": 4})
    assert ok.status_code == 200, ok.text
    with pytest.raises(ValueError, match="serve --decode: must be auto, graphed, static or eager"):
        ServeConfig(model="x", decode="fast").validate()


def test_forced_tau_gives_each_request_its_drawn_lengths_and_is_refused_where_it_cannot(
    folders, server_factory
):
    import zlib

    from hamburger.decode.continuous import Sequence, decode_all
    from hamburger.decode.forced import forced_lengths
    from trainer.serve.app import check_forcing

    srv = server_factory(folders["ham"], decode="eager", forced_tau=2.0)
    extra = 0  # tokens past each segment's first: one micro call each, one request at a time
    for prompt in PROMPTS[:3]:
        got = srv.post("/v1/completions", {"prompt": prompt, "max_tokens": 24, "ignore_eos": True}).json()
        ids = srv.engine.tokenizer(prompt)["input_ids"]
        seq = Sequence(
            prompt_ids=ids,
            max_new_tokens=24,
            ignore_eos=True,
            forced_lens=forced_lengths(2.0, 4, zlib.crc32(str(ids).encode())),
        )
        decode_all(ContinuousBatch(srv.engine.stepper, srv.engine.eos), [seq])
        assert got["hamburger"]["macro_steps"] == seq.macro_steps
        assert len(seq.seg_lens) < 20  # the drawn lengths (mean 2), not the stop head's
        extra += len(seq.tokens) - len(seq.seg_lens)
    assert _metrics(srv)["hamburger_batch_micro_calls_total"] == extra
    assert got["choices"][0]["text"] == srv.engine.tokenizer.decode(seq.tokens, skip_special_tokens=True)
    base = load_for_serving(str(folders["base"]))
    for cfg, loaded, fragment in (
        (ServeConfig(model="x", forced_tau=2.0), base, "needs a HAMburger model"),
        (ServeConfig(model="x", forced_tau=6.0, decode="eager"), srv.engine, r"must be in \[1, 4\]"),
    ):
        with pytest.raises(ValueError, match=fragment):
            check_forcing(cfg, loaded)


def test_max_segment_len_and_batch_aware_reach_the_eager_batch(folders):
    loaded = load_for_serving(str(folders["ham"]))
    batch = loaded.batch("eager", batch_aware=True, max_segment_len=2)
    assert batch.k == 2 and batch.rule is not None
    assert loaded.batch("eager").rule is None
