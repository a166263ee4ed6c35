"""`python -m mixtral_lite.chat` driven through a pseudo-terminal: answers, Ctrl-C, /stats, /reset, Ctrl-D."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time

from mixtral_lite.cli.chat import build_parser
from mixtral_lite.generation.decode import generate
from mixtral_lite.runtime.device import set_threads
from mixtral_lite.runtime.load import open_session
from mixtral_lite.runtime.plan import plan_load

TIMEOUT_S = 60


def _take_terminal():
    fcntl.ioctl(0, termios.TIOCSCTTY)  # the pty becomes the controlling terminal: Ctrl-C sends SIGINT


class Terminal:
    def __init__(self, argv):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     preexec_fn=_take_terminal)
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, after: int = 0) -> str:
        """Read until `text` appears after position `after`; return everything after `after`."""
        deadline = time.monotonic() + TIMEOUT_S
        while text not in self.seen[after:]:
            assert time.monotonic() < deadline, f"{text!r} not seen; got {self.seen[after:][-500:]!r}"
            if select.select([self.master], [], [], 0.5)[0]:
                self.seen += os.read(self.master, 65536).decode(errors="replace").replace("\r\n", "\n")
        return self.seen[after:]

    def send(self, data: str) -> int:
        mark = len(self.seen)
        os.write(self.master, data.encode())
        return mark

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=15)
        os.close(self.master)


def test_chat_interrupt_reuse_stats_reset_and_exit():
    flags = ["-t", "1", "--temperature", "0", "-n", "1000000", "--ignore-eos", "--system", "Be brief."]
    plan = plan_load(build_parser().parse_args(flags), show_cache_on_cpu=True)  # the shipped model, offloaded
    set_threads(plan.threads)                                                   # as the chat runs it
    session = open_session(plan)
    tok = session.tok
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    reference = tok.decode(generate(session.model, [tok.encode_chat(messages)], 300, window=session.window)[0])
    term = Terminal([sys.executable, "-m", "mixtral_lite.chat", *flags])
    try:
        term.expect("> ")
        for question in ("Hello there", "And then?"):
            mark = term.send(question + "\n")
            term.expect(question + "\n", mark)
            time.sleep(0.5)  # let it say something, then Ctrl-C: the answer stops, the chat stays
            term.send("\x03")
            out = term.expect("[stopped]\n> ", mark)
            answer = out[len(question) + 1 : out.index("\n[stopped]")].replace("^C", "")  # the tty echoes ^C
            answer = re.sub(r"warning: [^\n]*\n", "", answer)  # -n 1000000 passes -c: stderr warns, same tty
            if question == "Hello there":  # greedy: what was said is the start of generate's answer
                assert answer and reference.startswith(answer[:200]) and len(answer) < 10**5
        mark = term.send("/stats\n")
        stats = term.expect("host->device", mark)
        saved = int(stats.split("prefill tokens saved by reuse: ")[1].split()[0])
        assert "tok/s" in stats and "hit rate" in stats and saved >= len(tok.encode_chat(messages)) - 1
        mark = term.send("/reset\n")
        term.expect("(new conversation)", mark)
        term.send("\x04")  # Ctrl-D at the prompt leaves
        assert term.proc.wait(timeout=TIMEOUT_S) == 0
    finally:
        term.close()
