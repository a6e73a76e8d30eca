"""A small OpenAI-compatible chat-completions server for the rater tests, on 127.0.0.1 (a thread of the test).

Deterministic answers: a rating prompt (AlpaGasus's) gets "<rating>\\n<explanation>", the rating the number of words of
the response modulo 6; a YES/NO prompt gets the log-probabilities of YES and NO (P(YES) = 0.2 + 0.6 x (words mod 2))
when asked for; a pairwise comparison (QuRater's) prefers the longer response (P(A) = sigmoid(words A - words B),
"A" on a tie); a self-reflection (BSDetector's) says correct (A) when the proposed answer has an even number of
words; a plain question gets "one two three four". Responses containing REFUSE are refused, GARBLE gets an answer
without a number, and the first call of a prompt containing FLAKY answers 429 (with Retry-After: 0). It counts the
calls and keeps the Authorization headers it saw.
"""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Stats:
    def __init__(self):
        self.calls, self.authorizations, self.flaky_seen, self.lock = 0, set(), set(), threading.Lock()


def _response_words(prompt: str) -> int:
    found = re.search(r"Response: (.*?)(?:\n\n|$)", prompt, flags=re.S)
    return len(found.group(1).split()) if found else 0


def handler(stats: Stats):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = request["messages"][-1]["content"]
            with stats.lock:
                stats.calls += 1
                stats.authorizations.add(self.headers.get("Authorization"))
                if "FLAKY" in prompt and prompt not in stats.flaky_seen:
                    stats.flaky_seen.add(prompt)
                    return self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
            words = _response_words(prompt)
            if "REFUSE" in prompt:
                choices = [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": None,
                                                                             "refusal": "I can't help with that."}}]
                return self._send(200, {"choices": choices})
            if "Which of the two shows more" in prompt:  # QuRater: the example with the longer response wins
                a, b = (len(m.split()) for m in re.findall(r"Response: (.*?)\n\n", prompt + "\n\n", flags=re.S)[:2])
                p = 1 / (1 + math.exp(-(a - b)))
                choice = {"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "A" if a >= b else "B"}}
                if request.get("logprobs"):
                    choice["logprobs"] = {"content": [{"token": "A", "logprob": math.log(max(p, 1e-12)), "top_logprobs": [
                        {"token": "A", "logprob": math.log(max(p, 1e-12))},
                        {"token": "B", "logprob": math.log(max(1 - p, 1e-12))}]}]}
                return self._send(200, {"choices": [choice]})
            if "Is the proposed answer" in prompt:  # BSDetector's self-reflection: correct when the words are even
                found = re.search(r"Proposed answer: (.*?)\n\n", prompt, flags=re.S)
                verdict = "A" if len(found.group(1).split()) % 2 == 0 else "B"
                return self._send(200, {"choices": [{"index": 0, "finish_reason": "stop",
                                                     "message": {"role": "assistant", "content": verdict}}]})
            if prompt.startswith("Question"):  # a plain question (BSDetector's samples)
                choices = [{"index": k, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "one two three four"}}
                           for k in range(request.get("n", 1))]
                return self._send(200, {"choices": choices})
            if "YES or NO" in prompt:
                p = 0.2 + 0.6 * (words % 2)
                logprobs = {"content": [{"token": "YES", "logprob": math.log(p), "top_logprobs": [
                    {"token": "YES", "logprob": math.log(p)}, {"token": "NO", "logprob": math.log(1 - p)}]}]}
                choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "YES"}}
                if request.get("logprobs"):
                    choice["logprobs"] = logprobs
                return self._send(200, {"choices": [choice]})
            text = "I am not sure." if "GARBLE" in prompt else f"{words % 6}\nBecause it has {words} words."
            choices = [{"index": k, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                       for k in range(request.get("n", 1))]
            return self._send(200, {"choices": choices})

    return Handler


def start() -> tuple[str, Stats, ThreadingHTTPServer]:
    stats = Stats()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(stats))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", stats, server
