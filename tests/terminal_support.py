"""A command in a real pseudo-terminal of a chosen size, read as a person sees it.

tmux (scripts/bootstrap installs it) runs the command in a detached session
of WIDTH x HEIGHT on its own server socket; ``screen()`` is ``capture-pane``:
the rendered screen, after the terminal has applied every cursor movement
and redraw, so a progress bar redrawn in place shows as one line. The
command's exit code is written to a file by the pane's shell; ``keys()``
types (``C-c`` is Ctrl-C). ``close()`` kills the tmux server (and so the
pane's processes) by its socket.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# A colour in an SGR sequence as tmux re-emits it: 30-37, 90-97 or 38;5;N.
COLOUR_SGR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-7]|9[0-7]|38;5;\d+)(?:;[0-9;]*)?m")


class Terminal:
    def __init__(self, root: Path, width: int, height: int = 40) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.width = width
        self.height = height
        self.socket = root / "tmux.sock"
        self.exit_file = root / "exit-code"
        self.started = False

    def _tmux(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["tmux", "-S", str(self.socket), "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=30, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"tmux {args[0]}: {done.stderr}")
        return done.stdout

    def run(self, argv: Sequence[str], env: Mapping[str, str | None] | None = None) -> None:
        """Start ``argv`` in the pane; ``env``: variables to set (None: unset)."""
        assert not self.started, "one command per terminal"
        words = ["env"]
        for name, value in (env or {}).items():
            words += ["-u", name] if value is None else [f"{name}={value}"]
        # The shell survives the Ctrl-C sent to the pane (a handler, not SIG_IGN:
        # the command still gets SIGINT's default disposition), then records the
        # command's exit code and keeps the pane (and its screen) open.
        script = (f"trap : INT; {shlex.join([*words, *argv])}; "
                  f"echo $? > {shlex.quote(str(self.exit_file))}; sleep 3600")
        environ = {key: value for key, value in os.environ.items()
                   if key not in ("TMUX", "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")}
        subprocess.run(["tmux", "-S", str(self.socket), "-f", "/dev/null", "new-session", "-d",
                        "-x", str(self.width), "-y", str(self.height), "sh", "-c", script],
                       env=environ, check=True, timeout=30)
        self.started = True

    def screen(self, colours: bool = False) -> str:
        """The pane as text (``colours``: with SGR sequences), trailing blank lines cut."""
        text = self._tmux("capture-pane", "-p", *(["-e"] if colours else []), "-t", "0")
        return text.rstrip("\n")

    def lines(self) -> list[str]:
        return [line for line in self.screen().split("\n") if line.strip()]

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "0", *keys)

    def exit_code(self) -> int | None:
        try:
            return int(self.exit_file.read_text())
        except (OSError, ValueError):
            return None

    def wait_exit(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                return code
            time.sleep(0.05)
        raise AssertionError(f"no exit within {timeout}s; the screen:\n{self.screen()}")

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30,
                 what: str = "the screen") -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.05)
        raise AssertionError(f"{what} not seen within {timeout}s; the screen:\n{self.screen()}")

    def close(self) -> None:
        if self.started:
            self._tmux("kill-server", check=False)
