"""Small models of both frameworks with the same shapes, for the backend contract suite."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def zoo(backend: str) -> SimpleNamespace:
    return _torch_zoo() if backend == "torch" else _keras_zoo()


def _torch_zoo() -> SimpleNamespace:
    import torch
    from torch import nn

    torch.manual_seed(0)

    class MCNet(nn.Module):  # the reference article's PyTorch model
        def __init__(self, p: float = 0.5) -> None:
            super().__init__()
            self.fc1 = nn.Linear(784, 512)
            self.dropout = nn.Dropout(p)
            self.fc2 = nn.Linear(512, 10)

        def forward(self, x):
            return self.fc2(self.dropout(torch.relu(self.fc1(x))))

    class Augment(nn.Module):
        """Stands in for augmentation: flips the image only in training mode."""

        def forward(self, x):
            return torch.flip(x, dims=[-1]) if self.training else x

    def cnn():
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout2d(0.25),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout2d(0.25),
            nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10),
        )

    def with_bn_stats(model):
        """Give BatchNorm non-trivial running statistics, as after training."""
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(16, 1, 28, 28))
        model.eval()
        return model

    def snapshot(model):
        return (
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
        )

    def same(a, b) -> bool:
        return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])

    def bn_stats(model):
        return [b.detach().clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n]

    return SimpleNamespace(
        name="torch",
        mlp=lambda p=0.5: MCNet(p),
        cnn=lambda: with_bn_stats(cnn()),
        no_dropout=lambda: nn.Sequential(nn.Linear(784, 10)),
        augmented=lambda: nn.Sequential(Augment(), nn.Flatten(), nn.Linear(784, 10), nn.Dropout(0.5)),
        image=lambda rng, n: rng.standard_normal((n, 1, 28, 28)).astype(np.float32),
        vector=lambda rng, n: rng.standard_normal((n, 784)).astype(np.float32),
        tensor=lambda a: torch.from_numpy(a),
        deterministic=lambda model, x: model.eval()(torch.from_numpy(x)).detach().numpy(),
        snapshot=snapshot,
        same=same,
        bn_stats=bn_stats,
        weights=lambda model: [t.detach().numpy() for t in (*model.parameters(), *model.buffers())],
        dropout_count=lambda model: sum(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()),
    )


def _keras_zoo() -> SimpleNamespace:
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers

    class MCModel(keras.Model):  # the reference article's Keras model (its forced training=True removed)
        def __init__(self, p: float = 0.5) -> None:
            super().__init__()
            self.dense1 = L.Dense(128, activation="relu")
            self.dropout = L.Dropout(p)
            self.dense2 = L.Dense(10)

        def call(self, inputs, training=None):
            return self.dense2(self.dropout(self.dense1(inputs), training=training))

    def mlp(p: float = 0.5):
        model = MCModel(p)
        model(np.zeros((1, 784), np.float32))
        return model

    def cnn():
        inputs = keras.Input((28, 28, 1))
        h = L.Conv2D(8, 3, padding="same")(inputs)
        h = L.BatchNormalization()(h)
        h = L.MaxPooling2D()(L.ReLU()(h))
        h = L.SpatialDropout2D(0.25)(h)
        block = keras.Sequential([L.Conv2D(16, 3, padding="same"), L.BatchNormalization(), L.ReLU(), L.MaxPooling2D()])
        h = L.SpatialDropout2D(0.25)(block(h))  # a nested model
        h = L.Dropout(0.5)(L.Dense(32, activation="relu")(L.Flatten()(h)))
        model = keras.Model(inputs, L.Dense(10)(h))
        for _ in range(3):  # non-trivial moving statistics, as after training
            model(np.random.default_rng(1).standard_normal((16, 28, 28, 1)).astype(np.float32), training=True)
        return model

    def augmented():
        inputs = keras.Input((28, 28, 1))
        h = L.RandomFlip("horizontal")(inputs)
        h = L.RandomRotation(0.2)(h)
        h = L.Dropout(0.5)(L.Dense(10)(L.Flatten()(h)))
        return keras.Model(inputs, h)

    def snapshot(model):
        state = [v.numpy().copy() for v in model.variables]
        return state, [("call" in layer.__dict__) for layer in model._flatten_layers(include_self=True)]

    def same(a, b) -> bool:
        return a[1] == b[1] and len(a[0]) == len(b[0]) and all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))

    def bn_stats(model):
        return [v.numpy().copy() for v in model.variables if "moving" in v.path]

    def dropout_count(model):
        kinds = (L.Dropout, L.GaussianDropout, L.AlphaDropout)
        return sum(isinstance(layer, kinds) for layer in model._flatten_layers(include_self=True))

    return SimpleNamespace(
        name="tensorflow",
        mlp=mlp,
        cnn=cnn,
        no_dropout=lambda: keras.Sequential([keras.Input((784,)), L.Dense(10)]),
        augmented=augmented,
        image=lambda rng, n: rng.standard_normal((n, 28, 28, 1)).astype(np.float32),
        vector=lambda rng, n: rng.standard_normal((n, 784)).astype(np.float32),
        tensor=lambda a: keras.ops.convert_to_tensor(a),  # a tensor of the framework Keras runs on
        deterministic=lambda model, x: keras.ops.convert_to_numpy(model(x, training=False)),
        snapshot=snapshot,
        same=same,
        bn_stats=bn_stats,
        weights=lambda model: [np.asarray(v) for v in model.weights],  # not the dropout seed states
        dropout_count=dropout_count,
    )
