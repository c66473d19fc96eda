"""DynamicPrunedModel: an HF causal LM that routes every input to its cluster's mask (paper stage 2).

Each input is routed once, by its prompt, and its mask stays fixed for the whole generation. A batch
whose inputs route to different clusters runs as one batch, each row under its own cluster's mask
(igprune.blocks.masked_rows): one forward or one HF generate, with its return value, for the whole batch.
Static bundles (one cluster) skip routing.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import BatchEncoding, GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from igprune.blocks import KVPolicy, control_of, masked, masked_rows
from igprune.bundle import Bundle, as_bundle
from igprune.files import IGPruneError
from igprune.models import tokenizer_sides
from igprune.nll import next_token_nll
from igprune.routing import Route, Router


class DynamicPrunedModel:
    """A user's HF model, a tokenizer, a router and one binary mask per cluster.

    It behaves like the HF model where users expect it to (config, generation_config, device, dtype,
    forward, generate with its arguments), `use_cluster(k)` runs the user's own model under cluster k's
    mask and `use_clusters(ks)` each row of a batch under its own. The model itself is not changed: outside
    those calls it runs, saves and trains as before.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, router: Router,
                 masks: torch.Tensor, kv_policy: KVPolicy = "keep", bundle: Bundle | None = None):
        self.model, self.tokenizer, self.router = model, tokenizer, router
        self.control = control_of(model)
        if masks.shape != (router.n_routes, self.control.n_blocks):
            raise IGPruneError(f"masks of shape {tuple(masks.shape)} do not fit {router.n_routes} routes x "
                               f"{self.control.n_blocks} blocks")
        self.masks = masks.to(torch.bool)
        self.kv_policy = kv_policy
        self.bundle = bundle

    @classmethod
    def from_bundle(cls, model: PreTrainedModel, bundle: str | Path | Bundle,
                    tokenizer: PreTrainedTokenizerBase | None = None, kv_policy: KVPolicy = "keep",
                    route_tokens: int | None = None,
                    encoder_device: str | torch.device | None = None) -> DynamicPrunedModel:
        """Attach a bundle to its model; `route_tokens` overrides how much of a prompt the encoder reads; the
        encoder runs on `encoder_device`, by default the model's (its first shard's)."""
        bundle, where = as_bundle(bundle)
        bundle.check_model(model, where or "")
        if tokenizer is None:
            from igprune.models import load_tokenizer

            tokenizer = load_tokenizer(model.name_or_path)
        if encoder_device is None:
            from igprune.models import model_device

            encoder_device = model_device(model)
        router = Router.from_bundle(bundle, route_tokens, encoder_device)
        return cls(model, tokenizer, router, bundle.route_masks, kv_policy, bundle)

    # ---- what an HF model offers

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def generation_config(self) -> GenerationConfig:
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ---- routing

    def route(self, texts: list[str]) -> list[Route]:
        return self.router.route(texts)

    def mask_for(self, cluster: int) -> torch.Tensor:
        return self.masks[cluster]

    @contextlib.contextmanager
    def use_cluster(self, cluster: int) -> Iterator[PreTrainedModel]:
        """The user's own model under cluster `cluster`'s mask for the duration of a with-block.

            with pruned.use_cluster(k) as model:
                model.generate(**batch, do_sample=True, num_return_sequences=2)
        """
        with masked(self.model, self.masks[cluster], self.kv_policy) as model:
            yield model

    @contextlib.contextmanager
    def use_clusters(self, clusters: list[int]) -> Iterator[PreTrainedModel]:
        """The user's own model with row i of the batch under cluster `clusters[i]`'s mask (generate's repeated
        rows for num_return_sequences or beams follow their prompt's), for the duration of a with-block."""
        with masked_rows(self.model, self.masks[clusters], self.kv_policy) as model:
            yield model

    def clusters(self, texts: list[str]) -> list[int]:
        """Each input's cluster, for inputs given as text."""
        return [route.cluster for route in self.route(texts)]

    def _row_clusters(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      texts: list[str] | None) -> list[int]:
        """Each input row's cluster, routed by `texts` when given, else by decoding the row."""
        if texts is None:
            rows = input_ids if attention_mask is None else [r[m.bool()] for r, m in
                                                             zip(input_ids, attention_mask, strict=True)]
            texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        if len(texts) != input_ids.shape[0]:
            raise IGPruneError(f"{len(texts)} texts for {input_ids.shape[0]} input rows: give one text per row")
        return self.clusters(texts)

    # ---- running

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, texts: list[str] | None = None) -> CausalLMOutputWithPast:
        """Logits (and mean token loss if labels are given), each row under its routed mask.

        Rows are routed by `texts` when given, else by decoding `input_ids`.
        """
        with self.use_clusters(self._row_clusters(input_ids, attention_mask, texts)):
            # no KV cache: nothing reads it, and under "keep" skipped attentions would still fill it
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        loss = None
        if labels is not None:
            loss = next_token_nll(logits, labels, reduction="mean")
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    __call__ = forward

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 texts: list[str] | None = None, **generate_kwargs: Any) -> torch.Tensor | Any:
        """HF generate, with any of its arguments; each row routed by its prompt, mask fixed for the generation.

        One `model.generate` for the whole batch, each row under its cluster's mask: its return value,
        streamers and all. Prompts must be left-padded when batched.
        """
        input_ids = generate_kwargs.pop("inputs", input_ids)
        if input_ids is None or input_ids.shape[1] == 0:
            raise IGPruneError("empty prompt: give at least one token to generate from")
        clusters = self._row_clusters(input_ids, attention_mask, texts)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with self.use_clusters(clusters):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    def generate_text(self, prompts: list[str], max_new_tokens: int = 32, **generate_kwargs: Any) -> list[str]:
        """Convenience: prompts in, continuations out (greedy unless told otherwise)."""
        batch = encode_prompts(self.tokenizer, self.model.config, prompts, max_new_tokens).to(self.device)
        generate_kwargs.setdefault("do_sample", False)
        out = self.generate(batch.input_ids, batch.attention_mask, texts=prompts, max_new_tokens=max_new_tokens,
                            **generate_kwargs)
        return self.tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, prompts: list[str],
                   max_new_tokens: int) -> BatchEncoding:
    """Left-padded prompts for generation; a prompt longer than the context keeps its end (with a warning),
    the part the continuation follows from."""
    if max_new_tokens < 1:
        raise IGPruneError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if any(not p.strip() for p in prompts):
        raise IGPruneError("empty prompt: give some text to generate from")
    room = getattr(config, "max_position_embeddings", None)
    room = None if room is None else room - max_new_tokens
    if room is not None and room < 1:
        raise IGPruneError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                           f"context of {room + max_new_tokens} tokens; ask for fewer new tokens")
    lengths = [len(ids) for ids in tokenizer(prompts).input_ids]
    if room is not None and max(lengths) > room:
        warnings.warn(f"{sum(n > room for n in lengths)} prompt(s) longer than the {room} tokens the context "
                      f"leaves beside {max_new_tokens} new tokens: only their last {room} tokens are used",
                      stacklevel=3)
    with tokenizer_sides(tokenizer, padding="left", truncation="left"):
        return tokenizer(prompts, return_tensors="pt", padding=True, truncation=room is not None, max_length=room)
