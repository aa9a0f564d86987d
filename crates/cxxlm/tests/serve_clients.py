"""Real clients against a running `cxxlm serve`: the openai package, llama.vim's and
Continue's request shapes over plain HTTP, concurrency with a cancelled stream, a full
queue, bad requests. usage: serve_clients.py URL editors|busy"""
import http.client
import json
import sys
import threading
import time
import urllib.parse

import openai
from openai import OpenAI

URL = sys.argv[1]
SCENARIO = sys.argv[2]
HOST = urllib.parse.urlparse(URL)
client = OpenAI(base_url=URL + "/v1", api_key="unused", max_retries=0, timeout=120)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def raw(method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=120)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def health():
    status, data = raw("GET", "/health")
    check(status == 200, "/health answers 200")
    return json.loads(data)


def error_of(status, data, want_status, what):
    check(status == want_status, f"{what}: status {status} (want {want_status})")
    body = json.loads(data)
    check(isinstance(body.get("error"), dict) and body["error"].get("message"), f"{what}: OpenAI error shape: {body}")
    return body["error"]["message"]


def editors():
    h = health()
    check(h["status"] == "ok", "health is ok")
    models = client.models.list()
    check(models.data[0].id == "tiny", "models lists the served model")

    # OpenAI completions with suffix (FIM), greedy: the same text streamed and not.
    prefix, suffix = "int add(int a, int b) {\n    return", ";\n}\n"
    r1 = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=24, temperature=0)
    c = r1.choices[0]
    check(c.finish_reason in ("stop", "length") and isinstance(c.text, str), f"FIM completion: {c.text!r}")
    check(r1.usage.prompt_tokens > 5 and r1.usage.completion_tokens >= 1, f"usage: {r1.usage}")
    r2 = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=24, temperature=0)
    check(r2.choices[0].text == c.text, "greedy FIM is repeatable")
    cached = (r2.usage.prompt_tokens_details.cached_tokens if r2.usage.prompt_tokens_details else 0) or 0
    check(cached >= r2.usage.prompt_tokens - 1, f"the repeated prompt came from the cache ({cached} of {r2.usage.prompt_tokens})")
    # Another FIM prompt shares only its first specials with the last one: it is computed
    # from the start, not continued after them.
    r3 = client.completions.create(model="tiny", prompt="double scale(double x) {\n    return x", suffix=suffix, max_tokens=4, temperature=0)
    other = (r3.usage.prompt_tokens_details.cached_tokens if r3.usage.prompt_tokens_details else 0) or 0
    check(other == 0, f"an unrelated prompt reuses no short prefix ({other} tokens)")
    streamed = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=24, temperature=0, stream=True)
    parts, finish = [], None
    for chunk in streamed:
        parts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    check("".join(parts) == c.text and finish == c.finish_reason, f"streamed FIM equals the whole response ({len(parts)} chunks)")

    # Sampling with n, a stop string, echo.
    r = client.completions.create(model="tiny", prompt="#include <vector>\n", max_tokens=20, temperature=0.9, top_p=0.9, n=3, seed=1)
    check(len(r.choices) == 3 and [x.index for x in r.choices] == [0, 1, 2], "n=3 gives three choices")
    r = client.completions.create(model="tiny", prompt="#include <vector>\n", max_tokens=40, temperature=0, stop=["\n"])
    check("\n" not in r.choices[0].text, f"stop string ends the text: {r.choices[0].text!r}")
    r = client.completions.create(model="tiny", prompt="int x", max_tokens=4, temperature=0, echo=True)
    check(r.choices[0].text.startswith("int x"), "echo repeats the prompt")

    # The repetition guard (vLLM's name on OpenAI requests): greedy text pushed off its loop.
    plain = client.completions.create(model="tiny", prompt="#include <vector>\n", max_tokens=40, temperature=0)
    guarded = client.completions.create(model="tiny", prompt="#include <vector>\n", max_tokens=40, temperature=0,
                                        extra_body={"repetition_penalty": 3.0})
    check(guarded.choices[0].text != plain.choices[0].text,
          f"the repetition guard changes greedy text: {plain.choices[0].text!r} -> {guarded.choices[0].text!r}")
    error_of(*raw("POST", "/v1/completions", {"prompt": "int", "repetition_penalty": 0}), 400, "a zero repetition penalty")
    error_of(*raw("POST", "/infill", {"input_prefix": "a", "repeat_penalty": 1.1, "repeat_last_n": -2}), 400,
             "repeat_last_n below -1")

    # A plain prompt that opens a function body: the completion ends where the body does.
    r = client.completions.create(model="tiny", prompt="int twice(int x) {\n", max_tokens=120, temperature=0,
                                  extra_body={"ignore_eos": True})
    text, depth, end = r.choices[0].text, 1, None
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            end = i + 1
            break
    check(end is None or (end == len(text) and r.choices[0].finish_reason == "stop"),
          f"nothing follows the end of the body: {text!r}")

    # Re-indentation: the completion takes the file's indentation (4 spaces, depth 2).
    r = client.completions.create(model="tiny", prompt="void f(int n) {\n    for (int i = 0; i < n; ++i) {\n        ",
                                  suffix="\n    }\n}\n", max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
    lines = [l for l in r.choices[0].text.split("\n")[1:] if l.strip()]
    widths = [len(l) - len(l.lstrip(" ")) for l in lines]
    check(all(w % 4 == 0 for w in widths) and "\t" not in r.choices[0].text, f"completion lines are indented in fours: {widths}")
    check(not lines or lines[0].lstrip().startswith("}") or widths[0] >= 8, f"the line after the cursor's keeps its depth: {lines[:1]}")

    # Chat, whole and streamed.
    msgs = [{"role": "system", "content": "You write C++."}, {"role": "user", "content": "Write a function that adds two ints."}]
    chat = r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    check(r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str), "chat answers")
    s = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in s:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    check(text == r.choices[0].message.content and usage and usage.completion_tokens >= 1, "streamed chat equals the whole one, with usage")

    # llama.vim: the warm-up with repository context, then a completion (its exact fields).
    extra = [{"text": "struct Point {\n    int x;\n    int y;\n};\n", "time": 1, "filename": "point.h"},
             {"text": "int norm2(Point p);\n", "time": 2, "filename": "geometry.h"}]
    warm = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": extra, "prompt": "",
            "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False, "cache_prompt": True,
            "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]}
    cached_before = health()["tokens"]["cached"]
    status, data = raw("POST", "/infill", warm)
    check(status == 200 and json.loads(data) == {}, f"llama.vim's warm-up gets {{}}: {data[:80]!r}")
    fields = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
              "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
              "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated", "tokens_cached"]
    fim = {"id_slot": 0, "input_prefix": "#include \"point.h\"\n\nint norm2(Point p) {\n", "input_suffix": "\n}\n",
           "input_extra": extra, "prompt": "    return ", "n_predict": 32, "stop": [], "n_indent": 4, "top_k": 40,
           "top_p": 0.90, "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
           "t_max_prompt_ms": 500, "t_max_predict_ms": 1000, "response_fields": fields}
    status, data = raw("POST", "/infill", fim)
    check(status == 200, f"llama.vim's /infill answers: {data[:200]!r}")
    body = json.loads(data)
    check(set(body) == set(fields), f"response_fields picks exactly those: {sorted(body)}")
    check(isinstance(body["content"], str) and body["timings/predicted_n"] >= 1, f"infill content: {body['content']!r}")
    reused = health()["tokens"]["cached"] - cached_before
    check(reused > 20, f"the warm-up's repository context was reused: {reused} tokens")
    check(body["tokens_cached"] >= body["timings/predicted_n"], "tokens_cached counts the slot's cache")
    check(all(not l.strip() or len(l) - len(l.lstrip()) >= 4 for l in body["content"].split("\n")[1:]),
          "n_indent: no later line is indented less than 4")
    # Text after the cursor on its line (an auto-inserted `);`): the line-aligned model
    # writes the line to its end, and what goes in at the cursor is one line, before that text.
    mid = dict(fim, input_prefix="#include \"point.h\"\n\nint norm2(Point p) {\n    return dot(",
               input_suffix=");\n}\n", prompt="", n_indent=0, stream=False, response_fields=[])
    status, data = raw("POST", "/infill", mid)
    body = json.loads(data)
    check(status == 200 and body["tokens_predicted"] >= 1 and "\n" not in body["content"],
          f"a cursor inside its line gets one line: {body.get('content')!r}")

    # Continue's Ollama provider: /api/show says FIM, then /api/generate with suffix, NDJSON.
    status, data = raw("POST", "/api/show", {"name": "tiny"})
    check(status == 200 and ".Suffix" in json.loads(data)["template"], "Ollama /api/show announces FIM")
    req = {"model": "tiny", "prompt": "int square(int x) {\n    return", "suffix": ";\n}\n", "raw": True,
           "options": {"temperature": 0.01, "top_p": 0.9, "top_k": 40, "num_predict": 24,
                       "stop": ["\n\n", "<|eos|>"], "num_ctx": 512}, "keep_alive": 1800, "stream": True}
    status, data = raw("POST", "/api/generate", req)
    lines = [json.loads(l) for l in data.decode().split("\n") if l.strip()]
    check(status == 200 and lines[-1]["done"] is True and all(not l["done"] for l in lines[:-1]),
          f"Ollama streams NDJSON ending in done ({len(lines)} lines)")
    check(lines[-1]["eval_count"] >= 1 and "prompt_eval_count" in lines[-1], "Ollama's final line has counts")

    # Bad requests: a 4xx in the OpenAI shape, and the server keeps serving.
    error_of(*raw("POST", "/v1/completions", b"{\"prompt\": \"int\", "), 400, "malformed JSON")
    msg = error_of(*raw("POST", "/v1/completions", {"prompt": "int", "max_tokenz": 4}), 400, "unknown field")
    check("max_tokenz" in msg, f"the unknown field is named: {msg}")
    try:
        client.completions.create(model="tiny", prompt="int", max_tokens=-1)
        check(False, "negative max_tokens is refused")
    except openai.BadRequestError as e:
        check("max_tokens" in str(e), f"negative max_tokens: openai raises BadRequestError: {e}")
    msg = error_of(*raw("POST", "/v1/completions", {"prompt": "x " * 5000, "max_tokens": 4}), 400, "a prompt beyond the context")
    check("context" in msg, msg)
    error_of(*raw("POST", "/v1/completions", b"{\"prompt\": \"\xff\xfe\"}"), 400, "invalid UTF-8")
    error_of(*raw("POST", "/v1/completions", {"prompt": "int", "temperature": "hot"}), 400, "a wrong type")
    error_of(*raw("POST", "/v1/chat/completions", {"messages": [{"role": "function", "content": "x"}]}), 400, "an unsupported role")
    error_of(*raw("POST", "/infill", {"input_prefix": "a", "n_predict": -5}), 400, "n_predict below -1")
    error_of(*raw("GET", "/v1/completions"), 405, "a wrong method")
    error_of(*raw("GET", "/nowhere"), 404, "an unknown path")
    status, data = raw("POST", "/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_predictt": 3}})
    check(status == 400 and "num_predictt" in json.loads(data)["error"], "Ollama errors in Ollama's shape")

    # Concurrent requests; one is cancelled mid-stream (its client goes away). The count
    # is read once every earlier request has left its slot (on a busy machine a stream
    # closed above may still be ending).
    deadline = time.time() + 30
    while health()["slots_processing"] > 0 and time.time() < deadline:
        time.sleep(0.05)
    before = health()["requests"]["cancelled"]
    results = {}

    def cancelled():
        s = client.completions.create(model="tiny", prompt="namespace detail {\n", max_tokens=400, temperature=1.0,
                                      stream=True, extra_body={"ignore_eos": True})
        got = 0
        for _ in s:
            got += 1
            if got == 3:
                break
        s.close()
        results["cancelled"] = got

    def fim_request():
        results["fim"] = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=24, temperature=0).choices[0].text

    def chat_request():
        results["chat"] = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0).choices[0].message.content

    def infill_request():
        status, data = raw("POST", "/infill", fim)
        results["infill"] = status

    threads = [threading.Thread(target=f) for f in (cancelled, fim_request, chat_request, infill_request)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(results.get("fim") == c.text, "a FIM request beside others gives what it gives alone")
    check(results.get("chat") == chat.choices[0].message.content, "chat beside others gives what it gives alone")
    check(results.get("infill") == 200, "infill beside others")
    deadline = time.time() + 30
    while time.time() < deadline:
        h = health()
        if h["slots_processing"] == 0 and h["requests"]["cancelled"] > before:
            break
        time.sleep(0.05)
    check(h["requests"]["cancelled"] == before + 1, f"the abandoned stream was cancelled: {h['requests']}")
    check(h["slots_processing"] == 0, "no slot is left generating")
    check(h["tokens"]["generated"] < 10_000, "generation stopped")


def busy():
    # One slot and one waiting place: of four long requests at once, some are refused.
    statuses = []
    lock = threading.Lock()
    # No client lets go of its request before all four have their answer: a stream closed
    # early would free its slot for a later request.
    answered = threading.Barrier(4, timeout=60)

    def long_stream():
        conn = http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=120)
        body = json.dumps({"prompt": "class A {\n", "max_tokens": 400, "stream": True, "ignore_eos": True})
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        with lock:
            statuses.append(r.status)
        answered.wait()
        if r.status == 503:
            e = json.loads(r.read())
            check("busy" in e["error"]["message"] and e["error"]["type"] == "unavailable_error", f"503 says why: {e}")
        else:
            r.read(200)
        conn.close()

    threads = [threading.Thread(target=long_stream) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(statuses.count(503) >= 2 and statuses.count(200) >= 1, f"a full queue answers 503: {sorted(statuses)}")
    deadline = time.time() + 30
    while time.time() < deadline and health()["slots_processing"]:
        time.sleep(0.05)
    h = health()
    check(h["requests"]["rejected"] >= 2 and h["slots_processing"] == 0, f"rejections counted, slots freed: {h}")


{"editors": editors, "busy": busy}[SCENARIO]()
print(f"all {SCENARIO} checks passed")
