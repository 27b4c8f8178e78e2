"""The transformers engine: the reference implementation of the engine interface.

Slow next to vLLM, but simple enough to trust: other engines are tested for parity against it.
Log-probs are raw (temperature 1) as the interface specifies; sampling applies temperature/top-p.
"""

from __future__ import annotations

from pathlib import Path

import torch

from actors.engines.base import Engine, Generation, SamplingParams, Scores
from kd.models import hf_kwargs


class HFEngine(Engine):
    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "float32",
        device: str | None = None,
        max_batch_tokens: int = 16384,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), **hf_kwargs()
        ).to(self.device)
        self.model.eval()
        tok = AutoTokenizer.from_pretrained(model_path, **hf_kwargs())
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.max_batch_tokens = max_batch_tokens
        self.version = 0
        # A padded embedding (Qwen2.5-7B: 152064 rows for 151665 tokens) has rows that are no token:
        # never sample them, since the other model of a run may have fewer rows (kd/vocab.py)
        rows = self.model.get_input_embeddings().weight.shape[0]
        self.padding_ids = list(range(len(tok), rows)) or None

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        if params.seed is not None:
            torch.manual_seed(params.seed)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding so every row's next token is at the end
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        greedy = params.temperature == 0.0
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            suppress_tokens=self.padding_ids,
            return_dict_in_generate=True,
            output_logits=True,
        )
        new = out.sequences[:, width:].cpu()
        raw = torch.stack(out.logits, dim=1).float().log_softmax(-1).cpu()  # [B, new, V]
        lps = raw.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        k = params.top_k_logprobs
        top_v, top_i = raw.topk(k, dim=-1) if k > 0 else (None, None)
        gens = []
        for i in range(len(prompts)):
            toks = new[i].tolist()
            n = toks.index(self.eos_id) + 1 if self.eos_id in toks else len(toks)
            reason = "stop" if self.eos_id in toks[:n] else "length"
            g = Generation(toks[:n], lps[i, :n].tolist(), reason, self.version)
            if k > 0:
                g.topk_ids, g.topk_logprobs = top_i[i, :n].tolist(), top_v[i, :n].tolist()
            gens.append(g)
        return gens

    # -- scoring ------------------------------------------------------------------------------

    @torch.no_grad()
    def score(
        self, prompts: list[list[int]], continuations: list[list[int]], top_k: int = 0
    ) -> list[Scores]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        results: list[Scores] = []
        for chunk in self._chunks(prompts, continuations):
            results.extend(self._score_batch([prompts[i] for i in chunk],
                                             [continuations[i] for i in chunk], top_k))
        return results

    def _chunks(self, prompts, continuations):
        """Index groups whose padded size stays under max_batch_tokens (bounds [B, T, V] memory)."""
        chunk, width = [], 0
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            w = max(width, len(p) + len(c))
            if chunk and w * (len(chunk) + 1) > self.max_batch_tokens:
                yield chunk
                chunk, w = [], len(p) + len(c)
            chunk.append(i)
            width = w
        if chunk:
            yield chunk

    def _score_batch(self, prompts, continuations, top_k) -> list[Scores]:
        # Prompts left-padded to P, continuations right-padded to R: every continuation starts at
        # column P, so the head runs only on the R positions that predict continuation tokens.
        P, R = max(len(p) for p in prompts), max(1, max(len(c) for c in continuations))
        ids = torch.full((len(prompts), P + R), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            ids[i, P - len(p) : P + len(c)] = torch.tensor(p + c)
            attn[i, P - len(p) : P + len(c)] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                            position_ids=pos.to(self.device), logits_to_keep=torch.arange(P - 1, P - 1 + R),
                            use_cache=False).logits
        out = []
        for i, c in enumerate(continuations):
            if not c:
                out.append(Scores([], [], [], self.version))
                continue
            lp = logits[i, : len(c)].float().log_softmax(-1)
            target = torch.tensor(c, device=lp.device)
            tok_lp = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu().tolist()
            if top_k > 0:
                vals, idx = lp.topk(top_k, dim=-1)
                out.append(Scores(tok_lp, idx.cpu().tolist(), vals.cpu().tolist(), self.version))
            else:
                out.append(Scores(tok_lp, [], [], self.version))
        return out

    # -- weights ------------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, weights: dict, version: int) -> None:
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        # tied heads may be absent from a gathered state dict; anything else is a real mismatch
        missing = [k for k in missing if not (k == "lm_head.weight" and self.model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"weight update mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
        self.version = version
