"""`python -m mixtral_lite.chat`: a multi-turn chat in the terminal (llama.cpp's -cnv).

Answers stream as they are generated; each turn reuses the KV cache of the conversation so far.
Commands: /reset (new conversation), /stats (tok/s, expert cache, bytes), /exit.
Ctrl-C stops the current answer and keeps the chat; Ctrl-D at the prompt exits.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..generation.sampling import check_args
from ..generation.session import Generation, Params, Session
from ..runtime.device import set_threads
from ..runtime.flags import POSITIVE, add_model_args, add_sampling_args, resolve_seed
from ..runtime.load import open_session
from ..runtime.plan import plan_load

PROMPT = "> "


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixtral-lite-chat", description=__doc__.splitlines()[0])
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", help="system prompt (folded into the first user turn, as Mistral's template does)")
    p.add_argument("-n", "--max-new-tokens", type=POSITIVE, default=512, help="longest answer, in tokens")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")
    return p


class Chat:
    def __init__(self, session: Session, args):
        self.session, self.args = session, args
        self.history: list[dict] = []
        self.last: Generation | None = None

    def answer(self, text: str, write=sys.stdout.write) -> Generation:
        """Stream the answer to `text`; Ctrl-C (SIGINT) ends it early and keeps what was said."""
        system = [{"role": "system", "content": self.args.system}] if self.args.system else []
        messages = [*system, *self.history, {"role": "user", "content": text}]
        a = self.args
        params = Params(max_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                        seed=a.seed, ignore_eos=a.ignore_eos)
        gen = Generation(self.session.tok.encode_chat(messages), params)
        previous = signal.signal(signal.SIGINT, lambda signum, frame: gen.cancelled.set())
        pieces = []
        try:
            for step in self.session.run([gen]):
                for _, piece in step:
                    pieces.append(piece)
                    write(piece)
                    sys.stdout.flush()
        finally:
            signal.signal(signal.SIGINT, previous)
        write("\n" + ("[stopped]\n" if gen.finish_reason == "cancelled" else ""))
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]
        self.last = gen
        return gen

    def stats(self) -> str:
        g, s = self.last, self.session
        lines = [f"turns: {len(self.history) // 2}   prefill tokens saved by reuse: {s.prefill_saved}"]
        if g is not None:
            lines.append(f"last answer: {len(g.tokens)} tokens at {g.decode_tokens_per_s:.1f} tok/s, "
                         f"prompt {len(g.ids)} tokens ({g.cached_tokens} from the cache), "
                         f"first token after {((g.t_first or g.t_start) - g.t_start) * 1000:.1f} ms")
        e = s.model.experts.stats() if s.model.experts is not None else {}
        if "hit_rate" in e:
            recall = e.get("prefetch_recall")
            lines.append(f"experts: hit rate {e['hit_rate'] or 0:.3f}   prefetch recall "
                         f"{'-' if recall is None else f'{recall:.3f}'}   "
                         f"{e['bytes_host_to_device'] / 2**20:.1f} MiB host->device")
        return "\n".join(lines)

    def reset(self) -> None:
        self.history, self.last = [], None
        self.session.reset()


def repl(chat: Chat) -> None:
    print("mixtral-lite chat: /reset, /stats, /exit; Ctrl-C stops an answer, Ctrl-D exits", file=sys.stderr)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            chat.reset()
            print("(new conversation)")
        elif text == "/stats":
            print(chat.stats())
        elif text.startswith("/"):
            print(f"unknown command {text.split()[0]} (try /reset, /stats, /exit)")
        else:
            chat.answer(text)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    resolve_seed(args, "chat")  # generate's rule: a random seed, printed
    try:
        check_args(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    plan = plan_load(args, show_cache_on_cpu=True)  # the shipped model shows its expert cache in /stats
    set_threads(plan.threads)
    repl(Chat(open_session(plan), args))


if __name__ == "__main__":
    main()
