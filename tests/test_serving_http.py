"""``einshard serve`` as a real server process on a loopback port, talked to with the ``openai``
client and httpx: completions and chat (plain and streamed), greedy tokens against Hugging Face
``generate``, concurrency, a disconnect mid-stream, overload, bad JSON and bad parameters.

The checkpoint is a tiny random Llama saved with ``save_pretrained`` plus a small byte-level BPE
tokenizer with a chat template, written to a temporary folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers
import tokenizers

from conftest import ROOT

MODEL = "tiny-llama"
CONTEXT = 1024
LONG = 1000  # a generation the disconnect tests cut short: long enough (~1 s) to outlast noticing a close
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "def main():\n    print('hello, world')\n",
          "The capital of France is Paris. Numbers 0123456789.", "user assistant system hello"]


def write_checkpoint(d: Path) -> None:
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                                   initializer_range=0.2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(1234)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env.pop("XLA_FLAGS", None)  # one device is what this server needs
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "compiler.cli", "serve", "--checkpoint", str(ckpt), "--port", str(self.port),
             "--served-model-name", MODEL, "--context", str(CONTEXT), *args],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log

    def wait(self, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not up after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    write_checkpoint(d)
    return d


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    s = Server(ckpt, tmp_path_factory.mktemp("log") / "server.log", "--slots", "4", "--max-queue", "4")
    try:
        s.wait()
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=120, **kw)


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_models_health_and_metrics(server):
    m = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert m["data"][0]["id"] == MODEL and m["data"][0]["max_model_len"] == CONTEXT
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("einshard_queue_depth", "einshard_active_slots", "einshard_generated_tokens_total",
                 "einshard_time_to_first_token_seconds_bucket", "einshard_inter_token_latency_seconds_bucket"):
        assert name in r.text


def test_greedy_tokens_equal_transformers_generate(server, client, ckpt):
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt)
    for prompt in ([5, 17, 42, 99, 3], [250, 7]):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        want = out[0, len(prompt):].tolist()
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0,
                                             "ignore_eos": True, "return_token_ids": True})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == want
        assert choice["finish_reason"] == "length"
        c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert c.choices[0].text == choice["text"]
        assert c.usage.completion_tokens == 20 and c.usage.prompt_tokens == len(prompt)


def test_streaming_gives_the_same_text_and_ends_with_done(server, client):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_completion_plain_and_streamed(server, client):
    msgs = [{"role": "user", "content": "hello"}]
    c = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8
    parts = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == c.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "length"


def test_openai_client_usage_chunk_text_parts_and_unsupported_parameters(server, client):
    """stream_options.include_usage gives OpenAI's last chunk (no choices, the request's usage;
    it was never sent), text parts equal the string, an unsupported parameter is a 400 (it was
    silently ignored)."""
    msgs = [{"role": "user", "content": "hello"}]
    kw = dict(model=MODEL, max_tokens=5, temperature=0, n=2, extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True},
                                                 **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10 and all(c.usage is None for c in chunks[:-1])
    whole = client.chat.completions.create(messages=msgs, **kw)
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    parts = client.chat.completions.create(messages=[{"role": "user", "content": [{"type": "text", "text": "hel"},
                                                                                   {"type": "text", "text": "lo"}]}],
                                           **kw)
    assert [c.message.content for c in parts.choices] == [c.message.content for c in whole.choices]
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=2)
    assert ei.value.body["param"] == "logprobs"


def test_concurrent_requests_get_their_own_tokens(server):
    prompts = [[i + 3] * (2 + 3 * i) for i in range(4)]

    def body(p):
        return {"model": MODEL, "prompt": p, "max_tokens": 10 + 4 * (len(p) % 3), "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}

    alone = [post(server, "/v1/completions", body(p)).json()["choices"][0]["token_ids"] for p in prompts]

    async def together():
        async with httpx.AsyncClient(timeout=120) as c:
            rs = await asyncio.gather(*(c.post(server.url + "/v1/completions", json=body(p)) for p in prompts))
        return [r.json()["choices"][0]["token_ids"] for r in rs]

    assert asyncio.run(together()) == alone


def test_seeded_sampling_is_reproducible_and_n_gives_choices(server, client):
    kw = dict(model=MODEL, prompt="The capital", max_tokens=10, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"ignore_eos": True, "top_k": 20})
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b
    c = client.completions.create(n=3, **kw)
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2]
    assert c.choices[0].text == a  # choice i samples with seed + i


def test_stop_string_cuts_the_text(server, client):
    kw = dict(model=MODEL, prompt=[9, 8, 7], max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip() and stop in full
    c = client.completions.create(stop=[stop], **kw).choices[0]
    assert c.text == full[: full.index(stop)] and c.finish_reason == "stop"


def wait_aborted(server, aborted: float) -> None:
    """Waits (30 s at most) until one more request was aborted and no slot is active."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if metric(server, "einshard_requests_aborted_total") > aborted and metric(server, "einshard_active_slots") == 0:
            return
        time.sleep(0.2)
    raise AssertionError("the disconnected request kept its slot")


def test_disconnect_mid_stream_frees_the_slot(server):
    aborted = metric(server, "einshard_requests_aborted_total")
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": [4, 4], "max_tokens": LONG, "stream": True,
                            "ignore_eos": True}) as r:
        it = r.iter_lines()
        got = [next(it) for _ in range(4)]
    assert any(g.startswith("data: ") for g in got)
    wait_aborted(server, aborted)


def test_disconnect_from_a_plain_request_aborts_it(server):
    """A client that closes its connection while a non-streamed completion is generating: the
    request is aborted and its slot freed, not generated to the end for nobody."""
    aborted = metric(server, "einshard_requests_aborted_total")
    generated = metric(server, "einshard_generated_tokens_total")
    body = json.dumps({"model": MODEL, "prompt": [4, 4], "max_tokens": LONG, "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        end = time.monotonic() + 30
        while metric(server, "einshard_generated_tokens_total") < generated + 2 and time.monotonic() < end:
            time.sleep(0.05)  # generating
    wait_aborted(server, aborted)
    assert metric(server, "einshard_generated_tokens_total") < generated + LONG


def test_disconnect_while_queued_aborts_before_any_token(server):
    """A plain request that waits for a slot (every slot busy) and whose client goes away is
    aborted from the queue: it never takes a slot, and the running requests go on."""
    aborted = metric(server, "einshard_requests_aborted_total")
    body = {"model": MODEL, "prompt": [5, 5], "max_tokens": LONG, "stream": True, "ignore_eos": True}
    with contextlib.ExitStack() as stack:
        busy = [stack.enter_context(httpx.stream("POST", server.url + "/v1/completions", timeout=60, json=body))
                for _ in range(int(metric(server, "einshard_slots")))]
        lines = [r.iter_lines() for r in busy]  # kept: a dropped iterator closes its connection
        for it in lines:
            next(it)  # each has its slot
        raw = json.dumps({**body, "stream": False}).encode()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            end = time.monotonic() + 30
            while metric(server, "einshard_queue_depth") < 1 and time.monotonic() < end:
                time.sleep(0.05)
            assert metric(server, "einshard_queue_depth") == 1
        end = time.monotonic() + 30
        while metric(server, "einshard_requests_aborted_total") < aborted + 1 and time.monotonic() < end:
            time.sleep(0.1)
        assert metric(server, "einshard_requests_aborted_total") == aborted + 1
        assert metric(server, "einshard_queue_depth") == 0
        assert metric(server, "einshard_active_slots") == len(busy)  # the running ones go on
    wait_aborted(server, aborted + len(busy))


def test_bad_json_and_bad_parameters_are_4xx_with_openai_error_bodies(server, client):
    cases = [
        ("{not json", 400, None),
        ("[1, 2]", 400, None),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
        ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
        ({"model": MODEL, "prompt": "x", "stop": 3}, 400, "stop"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": [1] * (CONTEXT - 28), "max_tokens": 40}, 400, "max_tokens"),
        ({"model": "gpt-4", "prompt": "x"}, 404, None),
    ]
    for body, status, param in cases:
        r = post(server, "/v1/completions", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text
        assert err["param"] == param, (body, err)
    assert f"context is {CONTEXT} tokens" in post(server, "/v1/completions", cases[-2][0]).json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(server.url + "/v1/nothing", timeout=10).status_code == 404
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)


def test_overload_is_503_and_accepted_requests_complete(server):
    body = {"model": MODEL, "prompt": [6, 6, 6], "max_tokens": 60, "ignore_eos": True, "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(server.url + "/v1/completions", json=body) for _ in range(16)))

    rs = asyncio.run(burst())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    for r in rs:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "server_overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 60
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_bench_replays_a_trace_over_http(server, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serving.py"), "--url", server.url, "--requests", "6",
                        "--rates", "3", "6", "12", "--traces", "poisson", "--loads", "light", "--prompt-len", "2", "8",
                        "--output-len", "2", "6", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["scheduler"] == "http" and run["requests"] == 6
    assert run["failed"] == 0, run
    assert 6 * 2 <= run["generated"] <= 6 * 6 and run["ttft_p50_s"] > 0


@pytest.mark.slow
def test_sharded_server_greedy_tokens_equal_transformers(ckpt, tmp_path):
    """`serve --mesh x=2 --attn batch`: the slot buffer is sharded over 2 simulated devices (the
    server must set the devices up before JAX starts) and the tokens are still transformers'."""
    s = Server(ckpt, tmp_path / "server.log", "--mesh", "x=2", "--attn", "batch", "--slots", "4")
    try:
        s.wait()
        hf = transformers.LlamaForCausalLM.from_pretrained(ckpt)
        prompt = list(range(30, 70))
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        r = post(s, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                                        "ignore_eos": True, "return_token_ids": True})
        assert r.json()["choices"][0]["token_ids"] == want[0, len(prompt):].tolist()
    finally:
        s.close()
