"""The Files and Batches endpoints of the OpenAI-compatible test server (tests/fakes.py).

What the `openai` client's `files.create/retrieve/content` and `batches.create/retrieve/
cancel` call. A batch's lines are Chat Completions requests; each is answered by posting it
to the server's own /v1/chat/completions route, so a line gets exactly the reply a chat call
would, counts as a chat call, and takes the next scripted fault (`server.script`): a line
that fails goes to the batch's error file, the others to its output file.

A batch is `validating` for `server.batch_polls["validating"]` retrievals, then
`in_progress` for `server.batch_polls["in_progress"]` more and for at least
`server.batch_min_seconds` after its creation, then ends as `server.batch_outcome`
(`completed`, `failed` or `expired`): real waiting, as short as a test wants.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP

CHAT_ENDPOINT = "/v1/chat/completions"


def init_batch_state(server) -> None:
    """The batch settings and stores of a new server; `reset_batch_state` between tests."""
    server.files = {}  # id -> {"meta": FileObject dict, "content": bytes}
    server.batches = {}  # id -> Batch dict (plus private "_polls")
    server.batch_ids = itertools.count(1)
    server.batch_lock = threading.Lock()
    reset_batch_state(server)


def reset_batch_state(server) -> None:
    server.batch_polls = {"validating": 1, "in_progress": 1}
    server.batch_min_seconds = 0.0
    server.batch_outcome = "completed"
    server.batch_retrievals = 0


class BatchAPIMixin:
    """Routes /v1/files and /v1/batches; anything else goes to the chat/embeddings handler."""

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if not path.startswith(("/v1/files", "/v1/batches")):
            return super().do_GET()
        if not self._authorized():
            return self._error(401, "invalid api key")
        parts = path.strip("/").split("/")  # v1, files|batches, id[, content]
        if parts[1] == "files" and parts[2:3] and parts[2] not in self._server.files:
            return self._error(404, "no such file")
        if parts[1] == "files" and len(parts) == 3:
            return self._send_json(self._server.files[parts[2]]["meta"])
        if parts[1] == "files" and len(parts) == 4 and parts[3] == "content":
            content = self._server.files[parts[2]]["content"]
            return self.send(200, content, "application/octet-stream")
        if parts[1] == "batches" and len(parts) == 3:
            batch = self._advance(parts[2])
            return self._send_json(batch) if batch else self._error(404, "no such batch")
        return self._error(404, "no such route")

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if not path.startswith(("/v1/files", "/v1/batches")):
            return super().do_POST()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self._authorized():
            return self._error(401, "invalid api key")
        if path == "/v1/files":
            return self._upload(body)
        if path == "/v1/batches":
            return self._create_batch(json.loads(body or b"{}"))
        if path.startswith("/v1/batches/") and path.endswith("/cancel"):
            return self._cancel(path.split("/")[3])
        return self._error(404, "no such route")

    # ------------------------------------------------------------ helpers

    @property
    def _server(self):
        return self.server.owner  # type: ignore[attr-defined]

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self._server.api_key}"

    def _send_json(self, payload: dict):
        public = {k: v for k, v in payload.items() if not k.startswith("_")}
        return self.send(200, json.dumps(public).encode(), "application/json")

    def _store_file(self, name: str, purpose: str, content: bytes) -> str:
        server = self._server
        with server.batch_lock:
            file_id = f"file-{next(server.batch_ids)}"
            meta = {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": int(time.time()),
                "filename": name,
                "purpose": purpose,
                "status": "processed",
            }
            server.files[file_id] = {"meta": meta, "content": content}
        return file_id

    def _upload(self, body: bytes):
        """multipart/form-data with a `purpose` field and a `file` part."""
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = BytesParser(policy=HTTP).parsebytes(head + body)
        fields, filename, content = {}, "upload", b""
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                filename = part.get_filename() or filename
                content = part.get_payload(decode=True)
            else:
                fields[name] = part.get_payload(decode=True).decode()
        if fields.get("purpose") != "batch":
            return self._error(400, f"unsupported purpose {fields.get('purpose')!r}")
        file_id = self._store_file(filename, "batch", content)
        return self._send_json(self._server.files[file_id]["meta"])

    def _create_batch(self, body: dict):
        server = self._server
        if body.get("input_file_id") not in server.files:
            return self._error(400, "no such input file")
        if body.get("endpoint") != CHAT_ENDPOINT or body.get("completion_window") != "24h":
            return self._error(400, "only /v1/chat/completions batches with a 24h window")
        now = int(time.time())
        with server.batch_lock:
            batch_id = f"batch_{next(server.batch_ids)}"
            server.batches[batch_id] = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"],
                "completion_window": "24h",
                "status": "validating",
                "created_at": now,
                "expires_at": now + 86400,
                "metadata": body.get("metadata"),
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "_polls": 0,
                "_started": time.monotonic(),
            }
            batch = dict(server.batches[batch_id])
        return self._send_json(batch)

    def _cancel(self, batch_id: str):
        server = self._server
        with server.batch_lock:
            batch = server.batches.get(batch_id)
            if batch is None:
                return self._error(404, "no such batch")
            if batch["status"] in ("validating", "in_progress"):
                batch.update(status="cancelling", cancelling_at=int(time.time()))
            batch = dict(batch)
        return self._send_json(batch)

    def _advance(self, batch_id: str) -> dict | None:
        """One retrieval: count it and move the batch on when it has waited long enough."""
        server = self._server
        with server.batch_lock:
            server.batch_retrievals += 1
            batch = server.batches.get(batch_id)
            if batch is None:
                return None
            batch["_polls"] += 1
            step = self._next_status(batch)
            if step is not None:
                batch["status"] = "finalizing" if step == "run" else step
            if step in ("in_progress", "cancelled"):
                batch[f"{step}_at"] = int(time.time())
        if step == "run":
            self._run(batch)
        with server.batch_lock:
            return dict(batch)

    def _next_status(self, batch: dict) -> str | None:
        server = self._server
        polls, status = batch["_polls"], batch["status"]
        if status == "cancelling":
            return "cancelled"
        if status == "validating" and polls > server.batch_polls["validating"]:
            return "in_progress"
        waited = time.monotonic() - batch["_started"] >= server.batch_min_seconds
        total = server.batch_polls["validating"] + server.batch_polls["in_progress"]
        if status == "in_progress" and polls > total and waited:
            return "run"
        return None

    def _run(self, batch: dict) -> None:
        """End the batch as `server.batch_outcome`, answering its lines if it completes."""
        outcome = self._server.batch_outcome
        lines = self._server.files[batch["input_file_id"]]["content"].decode().splitlines()
        requests = [json.loads(line) for line in lines if line.strip()]
        now = int(time.time())
        if outcome == "failed":
            error = {"code": "invalid_request", "message": "scripted failure", "line": 1}
            errors = {"object": "list", "data": [error]}
            with self._server.batch_lock:
                batch.update(status="failed", failed_at=now, errors=errors)
            return
        if outcome == "expired":
            results = [_expired_line(i, request) for i, request in enumerate(requests)]
        else:
            results = [self._answer(i, request) for i, request in enumerate(requests)]
        self._finish(batch, results, outcome)

    def _finish(self, batch: dict, results: list[tuple[bool, dict]], outcome: str) -> None:
        ok = [line for good, line in results if good]
        bad = [line for good, line in results if not good]
        update = {
            "status": outcome,
            f"{outcome}_at": int(time.time()),
            "request_counts": {"total": len(results), "completed": len(ok), "failed": len(bad)},
        }
        for key, lines in (("output_file_id", ok), ("error_file_id", bad)):
            if lines:
                content = "".join(json.dumps(line) + "\n" for line in lines).encode()
                update[key] = self._store_file(
                    f"{batch['id']}_{key}.jsonl", "batch_output", content
                )
        with self._server.batch_lock:
            batch.update(update)

    def _answer(self, index: int, request: dict) -> tuple[bool, dict]:
        """Post one line to this server's chat route: the reply a chat call gets."""
        server = self._server
        connection = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1])
        try:
            connection.request(
                "POST",
                request["url"],
                body=json.dumps(request["body"]).encode(),
                headers={
                    "Authorization": f"Bearer {server.api_key}",
                    "Content-Type": "application/json",
                },
            )
            response = connection.getresponse()
            status, raw = response.status, response.read()
        finally:
            connection.close()
        line = {"id": f"batch_req_{index}", "custom_id": request["custom_id"], "error": None}
        try:
            body = json.loads(raw)
        except ValueError:
            line.update(response=None, error={"code": "server_error", "message": raw.decode()})
            return False, line
        line["response"] = {"status_code": status, "request_id": f"req_{index}", "body": body}
        return status == 200, line


def _expired_line(index: int, request: dict) -> tuple[bool, dict]:
    error = {"code": "batch_expired", "message": "This request could not be executed in time."}
    line = {"id": f"batch_req_{index}", "custom_id": request["custom_id"], "response": None}
    return False, {**line, "error": error}
