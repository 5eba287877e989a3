"""The workload on Flower's simulation engine (``flwr[simulation]``, Ray backend).

Run by ``benchmarks/peers.py`` inside its Flower venv: ``python flower_run.py WORKLOAD.npz``.
Idiomatic Flower (>= 1.20) Message API: a ServerApp running the built-in FedAvg strategy with a
central ``evaluate_fn``, a ClientApp with a ``@train`` handler. One change to match the other
frameworks' work exactly: the strategy still samples 10 of the 100 SuperNodes, but each message
names the cohort client to train (the exported cohort of that round), so every framework trains
the same clients on the same shards.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_common as pc
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

START = time.perf_counter()  # after the imports: peers.py times the whole process as well

WORKLOAD = os.environ["PEER_WORKLOAD"]
_W: pc.Workload | None = None


def workload() -> pc.Workload:
    global _W
    if _W is None:  # once per Ray actor process
        _W = pc.load(WORKLOAD)
        torch.set_num_threads(_W.threads)
    return _W


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    w = workload()
    model = pc.tiny_cnn(w.num_classes, w.in_chans, w.width)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    cfg = msg.content["config"]
    n = pc.train_client(model, w, int(cfg["client"]), int(cfg["seed"]))
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": n})})
    return Message(content=reply, reply_to=msg)


class CohortFedAvg(FedAvg):
    """Flower's FedAvg; each sampled node is told which exported cohort client it plays."""

    def __init__(self, cohorts, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.cohorts = cohorts

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        cohort = self.cohorts[server_round - 1]
        out = []
        for msg, client in zip(messages, cohort, strict=True):
            conf = ConfigRecord({"client": int(client), "seed": int(server_round * 100_003 + client)})
            out.append(Message(content=RecordDict({"arrays": arrays, "config": conf}),
                               message_type=msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id))
        return out


ACCS: list[float] = []
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    w = workload()
    model = pc.tiny_cnn(w.num_classes, w.in_chans, w.width)
    model.load_state_dict(w.init)
    rounds, k = w.cohorts.shape
    n = w.shards.shape[0]

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # the others do not evaluate the initial model
        model.load_state_dict(arrays.to_torch_state_dict())
        ACCS.append(pc.accuracy(model, w))
        return MetricRecord({"accuracy": ACCS[-1]})

    strategy = CohortFedAvg(w.cohorts, fraction_train=k / n, fraction_evaluate=0.0, min_train_nodes=k,
                            min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                   evaluate_fn=evaluate)


if __name__ == "__main__":
    w = workload()
    actors = int(os.environ.get("PEER_ACTORS", "1"))
    cpus = os.cpu_count() or 1
    # One actor with the workload's threads = the single-process layout of fedemu's 1-rank run.
    backend = {"client_resources": {"num_cpus": max(1, cpus // actors), "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=w.shards.shape[0],
                   backend_config=backend)
    pc.report("flower", START, ACCS, actors=actors, flwr=__import__("flwr").__version__)
