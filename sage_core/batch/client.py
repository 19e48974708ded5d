"""A small ComfyUI client: HTTP (stdlib) and websocket events (`websocket-client` when installed, else polling)."""
from __future__ import annotations

import json
import mimetypes
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from .errors import BatchError, JobError, ServerError

try:  # optional: live progress; without it the client polls /history
    import websocket as _websocket  # websocket-client
except ImportError:  # pragma: no cover - depends on the environment
    _websocket = None

STATS_EVENT = "sage_attention.stats"


def normalize_address(text: str) -> str:
    """'host:port', 'http://host:port/' or a bare port -> 'http://host:port'."""
    s = str(text).strip().rstrip("/")
    if not s:
        raise BatchError("empty --server address")
    if s.isdigit():
        s = f"127.0.0.1:{s}"
    if "://" not in s:
        s = "http://" + s
    u = urllib.parse.urlsplit(s)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise BatchError(f"invalid --server address {text!r}: expected host:port")
    try:
        u.port
    except ValueError:
        raise BatchError(f"invalid --server address {text!r}: bad port") from None
    return s


class ComfyClient:
    def __init__(self, address: str, timeout: float = 30.0, events: bool = True):
        self.base = normalize_address(address)
        self.timeout = timeout
        self.use_events = events
        self.client_id = uuid.uuid4().hex
        self._ws = None

    @property
    def label(self) -> str:
        return urllib.parse.urlsplit(self.base).netloc

    # ------------------------------------------------------------------ HTTP
    def _request(self, method, path, body=None, headers=None, timeout=None, raw=False):
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                data = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            raise _HTTPStatus(e.code, text) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
            raise ServerError(f"{self.label}: {getattr(e, 'reason', e)}") from None
        if raw:
            return data
        try:
            return json.loads(data.decode("utf-8")) if data else None
        except ValueError:
            raise ServerError(f"{self.label}: {path} did not answer JSON") from None

    def get_json(self, path, timeout=None):
        try:
            return self._request("GET", path, timeout=timeout)
        except _HTTPStatus as e:
            raise ServerError(f"{self.label}: GET {path} answered {e.code}: {e.text[:200]}") from None

    def post_json(self, path, payload, timeout=None):
        body = json.dumps(payload).encode("utf-8")
        return self._request("POST", path, body, {"Content-Type": "application/json"}, timeout=timeout)

    def alive(self, timeout=5.0) -> bool:
        try:
            self._request("GET", "/system_stats", timeout=timeout)
            return True
        except (ServerError, _HTTPStatus):
            return False

    def wait_ready(self, timeout=120.0, proc=None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise ServerError(f"{self.label}: the server exited with status {proc.returncode} while starting")
            if self.alive(timeout=3.0):
                return
            time.sleep(0.5)
        raise ServerError(f"{self.label}: not ready after {timeout:.0f} s")

    def object_info(self) -> dict:
        info = self.get_json("/object_info", timeout=max(self.timeout, 120))
        if not isinstance(info, dict) or not info:
            raise ServerError(f"{self.label}: /object_info is empty")
        return info

    def system_stats(self) -> dict:
        return self.get_json("/system_stats") or {}

    def queue_prompt(self, graph: dict, extra=None) -> str:
        payload = {"prompt": graph, "client_id": self.client_id}
        if extra:
            payload["extra_data"] = extra
        try:
            out = self.post_json("/prompt", payload)
        except _HTTPStatus as e:
            try:
                details = json.loads(e.text)
            except ValueError:
                details = {"text": e.text}
            raise JobError(f"{self.label} refused the job: {_describe_refusal(details)}", details) from None
        if not isinstance(out, dict) or "prompt_id" not in out:
            raise JobError(f"{self.label}: /prompt answered without a prompt_id: {out!r}")
        if out.get("node_errors"):
            raise JobError(f"{self.label} refused the job: {_describe_refusal(out)}", out)
        return out["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        h = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        return (h or {}).get(prompt_id)

    def queue_ids(self) -> set:
        q = self.get_json("/queue") or {}
        ids = set()
        for key in ("queue_running", "queue_pending"):
            for item in q.get(key) or []:
                if isinstance(item, (list, tuple)) and len(item) > 1:
                    ids.add(item[1])
        return ids

    def interrupt(self, prompt_id=None) -> None:
        try:
            if prompt_id:
                self.post_json("/queue", {"delete": [prompt_id]}, timeout=5)
            self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {}, timeout=5)
        except (ServerError, _HTTPStatus):
            pass

    def download(self, ref: dict, fp) -> int:
        """Stream one output file (a history entry: filename, subfolder, type) into an open binary file."""
        q = urllib.parse.urlencode({"filename": ref.get("filename", ""), "subfolder": ref.get("subfolder", ""),
                                    "type": ref.get("type", "output")})
        req = urllib.request.Request(f"{self.base}/view?{q}")
        total = 0
        try:
            with urllib.request.urlopen(req, timeout=max(self.timeout, 120)) as resp:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    fp.write(chunk)
                    total += len(chunk)
        except urllib.error.HTTPError as e:
            raise JobError(f"{self.label}: cannot download {ref.get('filename')}: HTTP {e.code}") from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
            raise ServerError(f"{self.label}: download of {ref.get('filename')} failed: {e}") from None
        return total

    def upload_input(self, path: str, name: str, subfolder: str = "", kind: str = "image") -> str:
        """Upload a local file into the server's input folder; returns the value a Load node takes."""
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        with open(path, "rb") as f:
            content = f.read()
        parts = []
        for field_name, value in (("type", "input"), ("subfolder", subfolder), ("overwrite", "true")):
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"\r\n\r\n'
            parts.append(f"{head}{value}\r\n".encode())
        parts.append((f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                      f"Content-Type: {ctype}\r\n\r\n").encode() + content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        try:
            out = self._request("POST", "/upload/image", b"".join(parts),
                                {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=300)
        except _HTTPStatus as e:
            raise BatchError(f"{self.label}: upload of {path} refused ({e.code}): {e.text[:200]}") from None
        sub = (out or {}).get("subfolder") or ""
        fname = (out or {}).get("name") or name
        return f"{sub}/{fname}" if sub else fname

    # ------------------------------------------------------------------ websocket
    @property
    def has_events(self) -> bool:
        return _websocket is not None and self.use_events

    def connect_events(self, timeout=10.0) -> bool:
        """Open the event stream for this client id (False when websocket-client is not installed)."""
        if not self.has_events:
            return False
        self.close_events()
        u = urllib.parse.urlsplit(self.base)
        scheme = "wss" if u.scheme == "https" else "ws"
        url = f"{scheme}://{u.netloc}/ws?clientId={self.client_id}"
        try:
            self._ws = _websocket.create_connection(url, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - any connection failure means the server is not usable
            self._ws = None
            raise ServerError(f"{self.label}: websocket: {e}") from None
        return True

    def next_event(self, timeout: float) -> dict | None:
        """The next JSON event, or None when nothing came within `timeout` (binary previews are skipped)."""
        if self._ws is None:
            time.sleep(timeout)
            return None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._ws.settimeout(left)
            try:
                msg = self._ws.recv()
            except _websocket.WebSocketTimeoutException:
                return None
            except (socket.timeout, TimeoutError):
                return None
            except Exception as e:  # noqa: BLE001 - closed, reset, ...
                self.close_events()
                raise ServerError(f"{self.label}: event stream lost: {e}") from None
            if isinstance(msg, bytes):
                continue
            try:
                event = json.loads(msg)
            except ValueError:
                continue
            if isinstance(event, dict):
                return event

    def close_events(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001
                pass

    @property
    def events_open(self) -> bool:
        return self._ws is not None


class _HTTPStatus(Exception):
    def __init__(self, code, text):
        super().__init__(f"HTTP {code}")
        self.code = code
        self.text = text


def _describe_refusal(details) -> str:
    if not isinstance(details, dict):
        return str(details)[:300]
    bits = []
    err = details.get("error")
    if isinstance(err, dict):
        bits.append(err.get("message") or err.get("type") or "")
        if err.get("details"):
            bits.append(str(err["details"]))
    elif err:
        bits.append(str(err))
    for nid, ne in (details.get("node_errors") or {}).items():
        for e in ne.get("errors") or []:
            bits.append(f"#{nid} {ne.get('class_type', '')}: {e.get('message', '')} {e.get('details', '')}".strip())
    return "; ".join(b for b in bits if b)[:1000] or json.dumps(details)[:300]


def output_refs(history_entry: dict, include_temp=False) -> list[tuple[str, dict]]:
    """(node id, file ref) for every file a finished prompt wrote, in node and list order."""
    out = []
    outputs = (history_entry or {}).get("outputs") or {}
    for nid in sorted(outputs, key=lambda n: (len(str(n)), str(n))):
        node_out = outputs[nid] or {}
        for key in sorted(node_out):
            items = node_out[key]
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and item.get("filename"):
                    kind = item.get("type", "output")
                    if kind == "output" or (include_temp and kind == "temp"):
                        out.append((str(nid), item))
    return out


def file_ext(ref: dict) -> str:
    ext = os.path.splitext(ref.get("filename", ""))[1].lower()
    return ext or ".bin"
