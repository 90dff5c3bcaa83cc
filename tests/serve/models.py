"""Small dropout models for the serving tests; importable factories (``tests.serve.models:torch_classifier``)
so a ``mcu serve`` subprocess and Ray Serve replicas build the same weights."""

from __future__ import annotations

N_FEATURES, N_CLASSES = 4, 3


def torch_classifier():
    """4 features -> 3 logits, Dropout 0.5; the same weights on every call."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, N_CLASSES)).eval()


def torch_regressor():
    import torch

    torch.manual_seed(1)
    nn = torch.nn
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1)).eval()


def keras_classifier():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((N_FEATURES,)), keras.layers.Dense(32, activation="relu"),
                             keras.layers.Dropout(0.5), keras.layers.Dense(N_CLASSES)])


def classifier(backend: str):
    return torch_classifier() if backend == "torch" else keras_classifier()


def tiny_bert():
    """A Hugging Face BertForSequenceClassification (random weights, 3 labels) taking input_ids + attention_mask
    and returning a ModelOutput: served with ``output="logits"``."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def token_labeller():
    """input_ids + attention_mask -> ``{"logits": ...}`` whose label is ``input_ids[:, 0] % 3`` whatever the
    dropout masks (a margin of 50 against dropout noise below 1): batched answers must keep each row's label."""
    import torch

    nn = torch.nn

    class TokenLabeller(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.drop, self.head = nn.Embedding(50, 8), nn.Dropout(0.5), nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
            pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
            noise = torch.tanh(self.head(self.drop(pooled)))
            return {"logits": 50.0 * nn.functional.one_hot(input_ids[:, 0] % 3, 3) + noise}

    torch.manual_seed(0)
    return TokenLabeller().eval()
