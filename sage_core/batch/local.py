"""Starting and stopping a ComfyUI server of the user's own install (COMFYUI_PATH, comfy-cli's workspace)."""
from __future__ import annotations

import configparser
import os
import signal
import socket
import subprocess
import sys
import time

from .client import ComfyClient
from .errors import BatchError, ServerError


def comfy_cli_workspace() -> str | None:
    """The default workspace recorded by comfy-cli (`comfy set-default`), if any."""
    candidates = []
    if sys.platform == "win32":
        candidates.append(os.path.join(os.environ.get("LOCALAPPDATA", ""), "comfy-cli", "config.ini"))
    elif sys.platform == "darwin":
        candidates.append(os.path.expanduser("~/Library/Application Support/comfy-cli/config.ini"))
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    candidates.append(os.path.join(xdg, "comfy-cli", "config.ini"))
    for path in candidates:
        if os.path.isfile(path):
            cp = configparser.ConfigParser()
            try:
                cp.read(path, encoding="utf-8")
            except configparser.Error:
                continue
            ws = cp.defaults().get("default_workspace")
            for section in cp.sections():
                ws = ws or cp.get(section, "default_workspace", fallback=None)
            if ws:
                return ws
    return None


def find_comfyui(explicit: str | None = None) -> str:
    """The ComfyUI folder to start: the given path, $COMFYUI_PATH, comfy-cli's default workspace, ~/comfy/ComfyUI."""
    tried = []
    for label, path in (("--comfyui-path", explicit), ("COMFYUI_PATH", os.environ.get("COMFYUI_PATH")),
                        ("comfy-cli default workspace", comfy_cli_workspace()),
                        ("comfy-cli default location", os.path.expanduser("~/comfy/ComfyUI"))):
        if not path:
            continue
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.isfile(os.path.join(path, "main.py")):
            return path
        if os.path.isfile(os.path.join(path, "ComfyUI", "main.py")):
            return os.path.join(path, "ComfyUI")
        tried.append(f"{label}: {path}")
        if label in ("--comfyui-path", "COMFYUI_PATH"):
            raise BatchError(f"no ComfyUI (main.py) at {path} ({label})")
    raise BatchError("no ComfyUI install found to start; pass --server HOST:PORT, --comfyui-path, or set COMFYUI_PATH"
                     + (f" (tried {'; '.join(tried)})" if tried else ""))


def comfy_python(comfy_path: str, explicit: str | None = None) -> str:
    if explicit:
        return explicit
    for venv in ("venv", ".venv", os.path.join("..", "venv"), os.path.join("..", ".venv")):
        for exe in (os.path.join("bin", "python"), os.path.join("Scripts", "python.exe")):
            p = os.path.normpath(os.path.join(comfy_path, venv, exe))
            if os.path.isfile(p):
                return p
    return sys.executable


def free_port(host="127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """One ComfyUI process on loopback, started by the batch command and stopped at its end."""

    def __init__(self, comfy_path: str, *, port: int | None = None, python: str | None = None, extra_args=(),
                 cuda_device: str | None = None, log_path: str | None = None, env: dict | None = None):
        self.comfy_path = comfy_path
        self.port = port or free_port()
        self.python = comfy_python(comfy_path, python)
        self.extra_args = list(extra_args)
        self.cuda_device = cuda_device
        self.log_path = log_path
        self.env = env
        self.proc = None
        self._log = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.python, os.path.join(self.comfy_path, "main.py"), "--listen", "127.0.0.1", "--port",
                str(self.port), "--disable-auto-launch", *self.extra_args]

    def start(self, timeout: float = 300.0) -> None:
        env = dict(os.environ if self.env is None else self.env)
        if self.cuda_device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.cuda_device)
        if self.log_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            self._log = open(self.log_path, "ab")
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # Ctrl-C reaches the batch command, which stops us in order
        else:
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        self.proc = subprocess.Popen(self.command(), cwd=self.comfy_path, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT, **kwargs)
        try:
            ComfyClient(self.address).wait_ready(timeout=timeout, proc=self.proc)
        except ServerError as e:
            self.stop()
            hint = f"; see {self.log_path}" if self.log_path else ""
            raise ServerError(f"local ComfyUI on {self.address} did not start: {e}{hint}") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            _signal_group(proc, force=False)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, force=True)
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout: float = 300.0) -> None:
        self.stop(grace=5.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _port_free(self.port):
            time.sleep(0.5)
        self.start(timeout=timeout)


def _port_free(port) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _signal_group(proc: subprocess.Popen, force: bool) -> None:
    """Stop the server and what it started: its process group on POSIX, the process elsewhere."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL if force else signal.SIGTERM)
        elif force:
            proc.kill()
        else:
            proc.terminate()
    except (ProcessLookupError, PermissionError, OSError):
        pass
