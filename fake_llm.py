"""A fake OpenAI and Anthropic API for the tests of cache.py's HTTP layer: stdlib only, on a free port of 127.0.0.1.

    srv = FakeLLM().start()   # srv.url is "http://127.0.0.1:PORT"
    OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0)
    Anthropic(base_url=srv.url, api_key="test", max_retries=0)
    srv.count                 # requests it answered so far, of any method and path
    srv.requests[-1]          # {"method", "path", "headers" (lower-case names), "body" (parsed if JSON, else bytes)}
    srv.errors = [429, 500]   # the next requests get these statuses, one each, with the APIs' JSON error
    srv.cut = "clean"         # streams lose their final event; "abort" also drops the connection mid-body; "error"
                              # puts an error event before it, as servers that fail mid-stream do
    srv.burst = True          # a stream's events go out in one write
    srv.delay = 0.2           # seconds before each answer, and between a stream's events
    srv.stop()

An answer's text is "echo <n>@<port>: <the last user text>", where n is the request's number, and its id carries n:
a hit repeats them, and two servers never answer alike. Requests that carry a JSON schema (tools, response_format,
the Responses API's text.format) get a value made from it. Any other path or method gets {"id": "obj_<n>", ...}.
"""
from __future__ import annotations

import array
import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
KINDS = {400: "invalid_request_error", 429: "rate_limit_error", 500: "api_error"}


def fill(schema: dict, root: dict | None = None):
    """A value that the JSON schema (a pydantic model's) accepts."""
    root = root or schema
    if "$ref" in schema:
        return fill(root["$defs"][schema["$ref"].split("/")[-1]], root)
    if "anyOf" in schema:
        return fill(schema["anyOf"][0], root)
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        return {name: fill(field, root) for name, field in schema.get("properties", {}).items()}
    if kind == "array":
        return [fill(schema.get("items", {}), root)]
    return {"string": "x", "integer": 1, "number": 1.5, "boolean": True}.get(kind)


def prompt(body: dict) -> str:
    """The last thing the user said, in any of the APIs' shapes."""
    said = body.get("messages") or body.get("input") or body.get("prompt") or ""
    said = said[-1] if isinstance(said, list) and said else said
    said = said.get("content") if isinstance(said, dict) else said
    if isinstance(said, list):  # content parts
        said = " ".join(part.get("text", "") for part in said if isinstance(part, dict))
    return str(said)


def words(text: str) -> list[str]:
    """A stream's deltas: text in pieces that join up again."""
    return [word + " " for word in text.split(" ")[:-1]] + text.split(" ")[-1:]


def chat(body: dict, n: int, text: str) -> dict | list:
    tools, schema = body.get("tools") or [], (body.get("response_format") or {}).get("json_schema")
    text = json.dumps(fill(schema["schema"])) if schema else text
    calls = [{"index": 0, "id": f"call_{n}", "type": "function", "function": {
        "name": tool["function"]["name"], "arguments": json.dumps(fill(tool["function"]["parameters"]))}}
        for tool in tools[:1]] or None
    base = {"id": f"chatcmpl-{n}", "created": 1, "model": body["model"], "system_fingerprint": "fp_fake"}
    finish = "tool_calls" if calls else "stop"
    if not body.get("stream"):
        message = {"role": "assistant", "content": None if calls else text, "refusal": None, "tool_calls": calls}
        return {**base, "object": "chat.completion", "usage": USAGE,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]}
    deltas = [{"role": "assistant", "content": ""}, *([{"tool_calls": calls}] if calls else
                                                        [{"content": word} for word in words(text)]), {}]
    chunks = [{**base, "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "finish_reason": None if delta else finish, "logprobs": None}]}
        for delta in deltas]
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
    return [(None, chunk) for chunk in chunks] + [(None, "[DONE]")]


def completions(body: dict, n: int, text: str) -> dict:
    return {"id": f"cmpl-{n}", "object": "text_completion", "created": 1, "model": body["model"], "usage": USAGE,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}]}


def embeddings(body: dict, n: int, text: str) -> dict:
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    vectors = [[float(len(str(each))), float(n), 0.5] for each in inputs]
    if body.get("encoding_format") == "base64":  # the openai SDK's default: float32s
        vectors = [base64.b64encode(array.array("f", vector).tobytes()).decode() for vector in vectors]
    return {"object": "list", "model": body["model"], "usage": {"prompt_tokens": 3, "total_tokens": 3},
            "data": [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)]}


def responses(body: dict, n: int, text: str) -> dict | list:
    schema = ((body.get("text") or {}).get("format") or {}).get("schema")
    text = json.dumps(fill(schema)) if schema else text
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"type": "message", "id": f"msg_{n}", "status": "completed", "role": "assistant", "content": [part]}
    answer = {"id": f"resp_{n}", "object": "response", "created_at": 1, "model": body["model"], "status": "completed",
              "output": [item], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
              "incomplete_details": None, "instructions": None, "metadata": {}, "temperature": 1.0, "top_p": 1.0,
              "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7,
                        "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}
    if not body.get("stream"):
        return answer
    at = {"item_id": f"msg_{n}", "output_index": 0, "content_index": 0}
    events = [("response.created", {"response": {**answer, "status": "in_progress", "output": [], "usage": None}}),
              ("response.output_item.added", {"output_index": 0, "item": {**item, "status": "in_progress",
                                                                            "content": []}}),
              ("response.content_part.added", {**at, "part": {**part, "text": ""}}),
              *[("response.output_text.delta", {**at, "delta": word, "logprobs": []}) for word in words(text)],
              ("response.output_text.done", {**at, "text": text, "logprobs": []}),
              ("response.content_part.done", {**at, "part": part}),
              ("response.output_item.done", {"output_index": 0, "item": item}),
              ("response.completed", {"response": answer})]
    return [(kind, {"type": kind, "sequence_number": i, **data}) for i, (kind, data) in enumerate(events)]


def messages(body: dict, n: int, text: str) -> dict | list:
    tool = (body.get("tools") or [None])[0]
    block = {"type": "tool_use", "id": f"toolu_{n}", "name": tool["name"], "input": fill(tool["input_schema"])} \
        if tool else {"type": "text", "text": text}
    stop = "tool_use" if tool else "end_turn"
    answer = {"id": f"msg_{n}", "type": "message", "role": "assistant", "model": body["model"], "content": [block],
              "stop_reason": stop, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 4}}
    if not body.get("stream"):
        return answer
    deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}] if tool else \
        [{"type": "text_delta", "text": word} for word in words(text)]
    events = [("message_start", {"message": {**answer, "content": [], "stop_reason": None,
                                             "usage": {"input_tokens": 3, "output_tokens": 1}}}),
              ("content_block_start", {"index": 0, "content_block": {**block, "input": {}} if tool else
                                       {"type": "text", "text": ""}}),
              ("ping", {}),
              *[("content_block_delta", {"index": 0, "delta": delta}) for delta in deltas],
              ("content_block_stop", {"index": 0}),
              ("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 4}}),
              ("message_stop", {})]
    return [(kind, {"type": kind, **data}) for kind, data in events]


ROUTES = {"/v1/chat/completions": chat, "/v1/completions": completions, "/v1/embeddings": embeddings,
          "/v1/responses": responses, "/v1/messages": messages}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; and streams are chunked, so that a dropped connection shows

    def log_message(self, *args) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:  # the client closed a stream early, or its idle connection
            pass

    def do_GET(self) -> None:
        self.answer(b"")

    def do_POST(self) -> None:
        self.answer(self.rfile.read(int(self.headers.get("content-length") or 0)))

    def answer(self, raw: bytes) -> None:
        fake, path = self.server.fake, self.path.partition("?")[0]
        body = json.loads(raw) if raw.startswith(b"{") else raw
        with fake.lock:
            fake.count += 1
            n, status = fake.count, fake.errors.pop(0) if fake.errors else 200
            fake.requests.append({"method": self.command, "path": self.path, "body": body,
                                  "headers": {name.lower(): value for name, value in self.headers.items()}})
        time.sleep(fake.delay)
        route = ROUTES.get(path) if self.command == "POST" and isinstance(body, dict) else None
        if status != 200:
            error = {"type": KINDS.get(status, "api_error"), "message": f"fake {status}", "param": None, "code": None}
            self.send(status, {"type": "error", "error": error}, ("retry-after-ms", "10"))  # SDK retries: 10 ms
        elif route is None:
            self.send(200, {"id": f"obj_{n}", "object": "file", "method": self.command, "path": self.path})
        elif isinstance(answer := route(body, n, f"echo {n}@{fake.port}: {prompt(body)}"), list):
            self.stream(answer)
        else:
            self.send(200, answer)

    def send(self, status: int, body: dict, *headers: tuple[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in [("content-type", "application/json"), ("content-length", str(len(data))), *headers]:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def stream(self, events: list) -> None:
        fake = self.server.fake
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        if fake.cut == "error":
            error = {"type": "error", "error": {"type": "api_error", "message": "fake mid-stream error"}}
            events = [*events[:-1], ("error" if events[0][0] else None, error), events[-1]]
        sent = events[:-1] if fake.cut in ("clean", "abort") else events
        texts = [(name, data if isinstance(data, str) else json.dumps(data)) for name, data in sent]
        body = [((f"event: {name}\n" if name else "") + f"data: {text}\n\n").encode() for name, text in texts]
        for event in [b"".join(body)] if fake.burst else body:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            time.sleep(fake.delay)
        if fake.cut == "abort":
            self.close_connection = True  # without the last chunk: the client reads an incomplete body
        else:
            self.wfile.write(b"0\r\n\r\n")


class FakeLLM:
    def __init__(self) -> None:
        self.count, self.requests, self.errors, self.cut, self.delay, self.burst = 0, [], [], None, 0.0, False
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.fake = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeLLM:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()  # stop() waits so long
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
