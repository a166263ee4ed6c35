"""`python -m mixtral_lite.chat`: a multi-turn chat in the terminal (llama.cpp's -cnv).

Answers stream as they are generated; each turn reuses the KV cache of the conversation so far.
Commands: /reset (new conversation), /stats (tok/s, expert cache, bytes), /exit.
Ctrl-C stops the current answer and keeps the chat; Ctrl-D at the prompt exits.
A model without chat training (the shipped one) is named as such once; a conversation that passes the
trained context (max_position_embeddings) gets one warning.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..runtime.flags import POSITIVE, Parser, add_model_args, add_sampling_args, resolve_seed
from .front_door import describe, fail, front_door, guard_std_streams

PROMPT = "> "


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mixtral-lite-chat", description=__doc__.splitlines()[0])
    add_model_args(p, shipped_offloads_on_cpu=True)
    add_sampling_args(p)
    p.add_argument("--system", help="system prompt (folded into the first user turn, as Mistral's template does)")
    p.add_argument("-n", "--max-new-tokens", type=POSITIVE, default=512, help="longest answer, in tokens")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")
    return p


class Chat:
    def __init__(self, session, args, ctx_size: int | None = None):
        self.session, self.args = session, args
        self.ctx_size = ctx_size or session.window  # -c: the window a model without a sliding window keeps
        self.history: list[dict] = []
        self.last = None
        self._warned: set[str] = set()  # each context warning once per conversation

    def answer(self, text: str, write=None):
        """Stream the answer to `text`; Ctrl-C (SIGINT) ends it early and keeps what was said. A failed
        answer raises; the conversation keeps what was said before it."""
        from ..generation.session import Generation, Params
        from ..runtime.about import context_warning
        from ..runtime.checks import context_warnings

        write = write or sys.stdout.write
        system = [{"role": "system", "content": self.args.system}] if self.args.system else []
        messages = [*system, *self.history, {"role": "user", "content": text}]
        a = self.args
        params = Params(max_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                        seed=a.seed, ignore_eos=a.ignore_eos)
        gen = Generation(self.session.tok.encode_chat(messages), params)
        warnings = context_warnings(self.session.model.config, self.ctx_size, len(gen.ids), a.max_new_tokens,
                                    "answer (-n)")
        for kind, line in warnings.items():  # generate's warnings, once per conversation
            if kind not in self._warned and kind != "trained":  # trained: from what was said, below
                self._warned.add(kind)
                print(line, file=sys.stderr)
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
        if gen.error is not None:
            raise RuntimeError(gen.error)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]
        self.last = gen
        trained = context_warning(len(gen.ids) + len(gen.tokens), self.session.model.config.max_position_embeddings)
        if trained and "trained" not in self._warned:  # the conversation as it is, not the longest answer -n allows
            self._warned.add("trained")
            print(f"warning: {trained} (/reset)", file=sys.stderr)
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
            lines.append(f"experts: hit rate {e['hit_rate'] or 0:.3f} (no transfer this token)   prefetch "
                         f"{e.get('prefetch_issued', 0)} issued, {e.get('prefetch_used', 0)} used, "
                         f"{e.get('prefetch_wasted', 0)} wasted, recall {'-' if recall is None else f'{recall:.3f}'}   "
                         f"{e['bytes_host_to_device'] / 2**20:.1f} MiB host->device")
        return "\n".join(lines)

    def reset(self) -> None:
        self.history, self.last, self._warned = [], None, set()
        self.session.reset()


def repl(chat: Chat, note: str | None = None) -> None:
    print("mixtral-lite chat: /reset, /stats, /exit; Ctrl-C stops an answer, Ctrl-D exits", file=sys.stderr)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a pasted line that is not UTF-8 is refused, not fatal
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
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
            where = f" (byte {byte:#04x} at offset {e.start})" if byte is not None else ""
            print(f"error: that line is not UTF-8 text{where}; not sent", file=sys.stderr)
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
            try:
                chat.answer(text)
            except Exception as e:  # noqa: BLE001 - one line; the conversation so far is kept
                print(f"error: {describe(e)} (the conversation so far is kept; /reset starts afresh)",
                      file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with front_door():  # generate's one-line errors: config, checkpoint, flags, Ctrl-C while loading
        _main(args)


def _main(args) -> None:
    from ..generation.sampling import check_args
    from ..runtime.about import chat_note
    from ..runtime.checks import check_kv_memory, open_tokenizer
    from ..runtime.device import set_threads
    from ..runtime.load import open_session
    from ..runtime.plan import plan_load
    from ..runtime.sizing import decide

    guard_std_streams()
    try:
        check_args(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise fail(str(e)) from None
    plan = plan_load(args, show_cache_on_cpu=True)  # the shipped model shows its expert cache in /stats
    decided = decide(plan)  # the planner's flag checks, before anything loads
    open_tokenizer(plan)  # generate's check of tokenizer.model against config.json
    check_kv_memory(plan, plan.window)
    resolve_seed(args, "chat")  # generate's rule: a random seed, printed
    set_threads(plan.threads)
    repl(Chat(open_session(plan, decided), args, args.ctx_size), chat_note(plan.model_dir))


if __name__ == "__main__":
    main()
