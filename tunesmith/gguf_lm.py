"""An lm-eval model over an in-process `llama_cpp.Llama(logits_all=True)`.

lm-eval's own `gguf` model type talks to llama-cpp-python's HTTP server: it miscounts
log-likelihoods (the server echoes extra empty tokens) and ignores max_gen_toks. Here every
number comes straight from llama.cpp's logits, so a GGUF is scored on exactly the prompts the
HF model saw: same text, greedy decoding, the same stop strings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import LM

from tunesmith.llamacpp import log_softmax, open_llama

log = logging.getLogger("tunesmith.gguf_lm")


class LlamaCppLM(LM):
    """Greedy generate_until and exact loglikelihood over llama.cpp logits."""

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, threads: int = 2) -> None:
        super().__init__()
        self.path = str(path)
        self.n_ctx = n_ctx
        self.llm = open_llama(path, n_ctx=n_ctx, threads=threads, logits_all=True)
        meta = self.llm.metadata
        # Mirror HF's add_special_tokens=True: BOS only where the vocab asks for it.
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self.eos = self.llm.token_eos()

    # lm-eval reads these for result metadata
    @property
    def tokenizer_name(self) -> str:
        return Path(self.path).name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def close(self) -> None:
        self.llm.close()

    # ------------------------------------------------------------ helpers
    def _tok(self, text: str, bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=bos and self.add_bos, special=True)

    def _logprobs(self, tokens: list[int]) -> np.ndarray:
        if len(tokens) > self.n_ctx:
            tokens = tokens[-self.n_ctx:]
        self.llm.reset()
        self.llm.eval(tokens)
        return log_softmax(np.asarray(self.llm.scores[: len(tokens)]))

    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        full = (ctx + cont)[-self.n_ctx:]
        n_cont = len(cont)
        lp = self._logprobs(full)
        # Row i predicts token i+1: the continuation is predicted by rows [-n_cont-1, -1).
        rows = lp[len(full) - n_cont - 1: len(full) - 1]
        total = float(sum(rows[i, t] for i, t in enumerate(cont)))
        greedy = bool(all(int(rows[i].argmax()) == t for i, t in enumerate(cont)))
        return total, greedy

    # ------------------------------------------------------------ lm-eval API
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            ctx, cont = self._encode_pair(*req.args)
            out.append(self._score(ctx or [self.eos], cont))
        return out

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context, continuation) tokens split as lm-eval's TemplateLM does, so token counts of the
        HF and the GGUF models are counted the same way."""
        # trailing spaces of the context belong to the continuation
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._tok(context + continuation, bos=True)
        ctx = self._tok(context, bos=True)
        return ctx, whole[len(ctx):]

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            toks = self._tok(text, bos=False)
            ctx = [self.llm.token_bos() if self.add_bos else self.eos]
            total = 0.0
            step = self.n_ctx - 1
            for start in range(0, len(toks), step):
                window = toks[start:start + step]
                prefix = ctx if start == 0 else toks[max(0, start - 1):start]
                score, _ = self._score(prefix, window)
                total += score
            out.append(total)
        return out

    def generate_until(self, requests: list[Any]) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            max_gen = int(kwargs.get("max_gen_toks", 256))
            prompt = self._tok(context, bos=True)
            prompt = prompt[-(self.n_ctx - max_gen):]
            out.append(self._greedy(prompt, until, max_gen))
        return out

    def _greedy(self, prompt: list[int], until: list[str], max_gen: int) -> str:
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.llm.reset()
        self.llm.eval(prompt)
        generated: list[int] = []
        text = ""
        for _ in range(max_gen):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if llama_cpp.llama_vocab_is_eog(vocab, nxt):
                break
            generated.append(nxt)
            # special=True so stop strings such as "<|im_end|>" show up in the text.
            text = self.llm.detokenize(generated, special=True).decode("utf-8", errors="ignore")
            cut = [text.index(s) for s in until if s and s in text]
            if cut:
                return text[: min(cut)]
            if self.llm.n_tokens >= self.n_ctx:
                break
            self.llm.eval([nxt])
        return text
