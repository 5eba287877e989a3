"""The workload on pfl-research (``pfl``, PyTorch, simulated backend in one process).

Run by ``benchmarks/peers.py`` inside its pfl venv: ``python pfl_run.py`` (workload from
``PEER_WORKLOAD``). Idiomatic pfl: a ``PyTorchModel`` with ``loss``/``metrics``, ``FederatedAveraging``
with a central SGD optimizer at lr 1 (so the averaged model difference is applied as is),
``SimulatedBackend`` over a ``FederatedDataset``. Its user sampler replays the exported cohorts, so it
trains the same clients as the other frameworks; a callback evaluates after every central iteration
(pfl's ``CentralEvaluationCallback`` would also evaluate the initial model, which the others do not).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_common as pc
import torch
from pfl.aggregate.simulate import SimulatedBackend
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from torch import nn

START = time.perf_counter()  # after the imports: peers.py times the whole process as well


class Net(nn.Module):
    def __init__(self, w: pc.Workload) -> None:
        super().__init__()
        self.net = pc.tiny_cnn(w.num_classes, w.in_chans, w.width)
        self.net.load_state_dict(w.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        self.eval() if eval else self.train()
        return nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict:
        self.eval() if eval else self.train()
        logits = self(x)
        n = len(y)
        return {"loss": Weighted(float(nn.functional.cross_entropy(logits, y, reduction="sum")), n),
                "accuracy": Weighted(float((logits.argmax(1) == y).sum()), n)}


class Evaluate(TrainingProcessCallback):
    """Central test accuracy after every central iteration (same code as the other peers)."""

    def __init__(self, net: Net, w: pc.Workload) -> None:
        self.net, self.w, self.accs = net, w, []

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):  # type: ignore[no-untyped-def]
        self.accs.append(pc.accuracy(self.net.net, self.w))
        return False, Metrics()


def main() -> None:
    w = pc.load(os.environ["PEER_WORKLOAD"])
    torch.set_num_threads(w.threads)
    torch.manual_seed(w.seed)
    rounds, k = w.cohorts.shape
    order = iter(w.cohorts.reshape(-1).tolist())

    def make_user(user_id: int) -> Dataset:
        x, y = pc.batch(w, w.shards[user_id])
        return Dataset(raw_data=[x, y], user_id=str(user_id))

    train_data = FederatedDataset(make_dataset_fn=make_user, user_sampler=lambda: next(order))
    net = Net(w)
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    params = NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds + 1,
                               train_cohort_size=k, val_cohort_size=None)
    train = NNTrainHyperParams(local_num_epochs=w.local_epochs, local_learning_rate=w.lr,
                               local_batch_size=w.batch_size)
    evaluate = Evaluate(net, w)
    backend = SimulatedBackend(training_data=train_data, val_data=None)
    FederatedAveraging().run(algorithm_params=params, backend=backend, model=model, model_train_params=train,
                             model_eval_params=NNEvalHyperParams(local_batch_size=w.eval_batch_size),
                             callbacks=[evaluate])
    pc.report("pfl", START, evaluate.accs, pfl=__import__("pfl").__version__)


if __name__ == "__main__":
    main()
