"""LearnerGroup: K learner actors forming one data-parallel DeepSpeed group.

Each rank receives the same batch (one object in the Ray object store) and trains on rows
``rank::K``; losses are normalised by global counts so K ranks take the same step as one.
"""

from __future__ import annotations

import socket

import ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LearnerGroup:
    def __init__(self, num_learners: int, actor_options: dict, model_path: str, learner_cfg,
                 loss_cfg, seed: int = 0):
        from actors.learner import Learner

        remote = ray.remote(Learner)
        # Rank 0's node hosts the rendezvous; on one machine loopback is enough.
        addr = ray.util.get_node_ip_address() if num_learners > 1 else "127.0.0.1"
        port = _free_port()
        self.learners = [
            remote.options(name=f"learner-{r}", **actor_options).remote(
                r, num_learners, addr, port, model_path, learner_cfg, loss_cfg, seed)
            for r in range(num_learners)
        ]

    def ready_refs(self) -> list:
        return [a.ready.remote() for a in self.learners]

    def train_step(self, batch_ref, loss_cfg=None) -> ray.ObjectRef:
        """Start one step on every rank; returns rank 0's metrics ref (all ranks step together).
        ``loss_cfg`` overrides the group's loss for this step (a phase's own loss)."""
        refs = [a.train_step.remote(batch_ref, loss_cfg) for a in self.learners]
        return refs[0]

    def weights_ref(self) -> ray.ObjectRef:
        """Rank 0's full state dict, left in the object store (every rank joins the gather)."""
        refs = [a.get_weights.remote() for a in self.learners]
        return refs[0]

    def save_hf(self, path: str, tokenizer_src: str) -> str:
        return ray.get([a.save_hf.remote(path, tokenizer_src) for a in self.learners])[0]
