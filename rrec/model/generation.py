"""Rollout engines: sample reasoning, end it with `<answer>`, read the user state there.

One contract, two engines:
- `hf` (default, CPU or GPU): a cached decoding loop over the `transformers` model
  (`HFEngine._decode`), then ONE extra cached decoder step that feeds `<answer>` on
  top of the decoding's KV cache. The user
  state `h_u` therefore comes out of the same pass that wrote the reasoning; the
  sequence is never re-encoded. With `model.aot_single_requests`, a greedy request on
  its own runs the same loop on the decoder compiled ahead of time (`rrec.model.aot`).
- `vllm` (optional `gpu` extra): vLLM samples the tokens; vLLM exposes no hidden
  states and reports log-probs of the raw logits, so `h_u` and the log-probs the update
  needs are read by one no-grad forward of the policy over the finished sequence
  (`score_trajectories`). The policy's weights are pushed to vLLM after every update
  (`sync_weights`).

A trajectory is `prompt + reasoning + <answer>`. Reasoning is text: every special
token but `<answer>` (chat-template tokens, end of turn, end of text) is masked out
of sampling and greedy decoding (`RecModel.banned_in_reasoning`). Generation stops at
`<answer>` or after `max_new_tokens`. When the policy
itself sampled `<answer>`, that token is part of the trajectory and its log-prob is
trained (the policy learns when to stop thinking); otherwise `<answer>` is appended
and not trained. Log-probs are those of the sampling distribution before top-k
truncation, `log_softmax(masked logits / temperature)`, the same quantity the update
recomputes, so the importance ratio starts at 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from rrec.model.last_layer import last_layer_only_at
from rrec.model.lora import merged_weights
from rrec.model.two_headed import (
    RecModel,
    SharedPrefix,
    position_ids_from_mask,
    shared_prefix_length,
)


@dataclass
class Rollout:
    """G trajectories per prompt, flattened (prompt-major: rows g*... of prompt b are
    contiguous)."""

    prompt_ids: list[list[int]]
    reasoning_ids: list[list[int]]  # sampled tokens, including a sampled final <answer>
    sampled_answer: list[bool]  # did the policy itself emit <answer>?
    old_logprobs: list[torch.Tensor]  # one value per reasoning token (float32, cpu)
    user_states: torch.Tensor  # [N, d] at the final <answer>, no grad

    @property
    def lengths(self) -> list[int]:
        """Reasoning length in tokens (without the control token)."""
        return [len(r) - int(a) for r, a in zip(self.reasoning_ids, self.sampled_answer, strict=True)]

    def sequences(self, answer_id: int) -> list[list[int]]:
        """Full token ids of each trajectory, ending with exactly one final <answer>."""
        out = []
        for p, r, a in zip(self.prompt_ids, self.reasoning_ids, self.sampled_answer, strict=True):
            out.append(list(p) + list(r) + ([] if a else [answer_id]))
        return out


class RolloutEngine(Protocol):
    def generate(
        self, model: RecModel, prompts: Sequence[Sequence[int]], *, group_size: int, greedy: bool
    ) -> Rollout: ...

    def sync_weights(self, model: RecModel) -> None: ...


def _stop_ids(model: RecModel) -> list[int]:
    """`<answer>` plus whatever ends a turn for this backbone (`RecModel.end_of_turn_ids`,
    e.g. `<|im_end|>`/`<end_of_turn>`). Reasoning masks every special token but
    `<answer>` (`RecModel.banned_in_reasoning`) unless `end_of_turn_stops`: then a turn's
    end also ends the reasoning; it is not kept, and `<answer>` is appended."""
    return sorted({model.answer_token_id, *model.end_of_turn_ids()})


class HFEngine:
    """A cached decoding loop + one cached `<answer>` step."""

    def __init__(
        self, temperature: float, top_k: int, max_new_tokens: int, batch_size: int = 64, *, read_states: bool = True
    ) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        # False: generation only, no `<answer>` step, empty user states [n, 0] (the first
        # stage of a two-stage pipeline, for comparisons)
        self.read_states = read_states

    def sync_weights(self, model: RecModel) -> None:
        """The HF engine samples from the policy object itself: nothing to copy."""

    @torch.no_grad()
    def generate(
        self,
        model: RecModel,
        prompts: Sequence[Sequence[int]],
        *,
        group_size: int = 1,
        greedy: bool = False,
        prefix: SharedPrefix | None = None,
    ) -> Rollout:
        """`prefix`: a head every prompt starts with, already encoded (`RecModel.shared_prefix`
        with the current weights); the prompt pass then runs only what follows it."""
        expanded = [list(p) for p in prompts for _ in range(group_size)]
        parts = [
            self._generate_batch(model, expanded[i : i + self.batch_size], greedy, prefix)
            for i in range(0, len(expanded), self.batch_size)
        ]
        return Rollout(
            prompt_ids=expanded,
            reasoning_ids=[r for p in parts for r in p.reasoning_ids],
            sampled_answer=[a for p in parts for a in p.sampled_answer],
            old_logprobs=[lp for p in parts for lp in p.old_logprobs],
            user_states=torch.cat([p.user_states for p in parts]),
        )

    def _generate_batch(
        self, model: RecModel, prompts: list[list[int]], greedy: bool, prefix: SharedPrefix | None = None
    ) -> Rollout:
        if greedy and len(prompts) == 1 and model.aot_single_requests:
            aot = model.aot_decoder(self.max_new_tokens)
            if aot.fits(len(prompts[0]), self.max_new_tokens):
                r = aot.greedy(
                    prompts[0], self.max_new_tokens, _stop_ids(model), model.answer_token_id,
                    banned=model.banned_in_reasoning(), read_state=self.read_states,
                )  # fmt: skip
                return Rollout([], [r.reasoning_ids], [r.sampled_answer], [r.logprobs], r.user_state.unsqueeze(0))
        lm = model.lm
        was_training = lm.training
        lm.eval()
        try:
            ids, mask = model.pad(prefix.suffixes(prompts) if prefix is not None else prompts, padding_side="left")
            generated, token_lp, cache = self._decode(model, ids, mask, greedy, prefix)
            full_mask = prefix.attention_mask(mask) if prefix is not None else mask
            return self._finish(model, full_mask, generated, token_lp, cache)
        finally:
            lm.train(was_training)

    def _decode(
        self, model: RecModel, ids: torch.Tensor, mask: torch.Tensor, greedy: bool, prefix: SharedPrefix | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
        """Sample (or greedily pick) up to `max_new_tokens` tokens per row.

        A plain cached loop over the decoder and the output head at the last position:
        what `generate` does for this case without its per-step processors and bookkeeping,
        which dominate a small model's decoding time. Returns the tokens [n, steps] (a
        row's tokens after its first stop token are padding), their log-probs under
        `log_softmax(logits / temperature)`, and the KV cache, which holds the prompt and
        every generated token but the last, like `generate`'s. With a `prefix`, `ids` and
        `mask` are what follows it and the cache starts as a copy of the prefix's.
        """
        decoder, head = model.lm.get_decoder(), model.lm.get_output_embeddings()
        temperature = 1.0 if greedy else self.temperature
        stop = torch.tensor(_stop_ids(model), device=ids.device)
        if prefix is None:
            cache, positions = DynamicCache(), position_ids_from_mask(mask)
            # generated columns are never padding: without left padding the fused causal
            # attention applies at every step and no mask is built
            attn = mask if not bool(mask.all()) else None
        else:
            cache, positions = prefix.for_batch(ids.shape[0]), len(prefix.ids) + position_ids_from_mask(mask)
            attn = prefix.attention_mask(mask)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        feed = ids
        tokens, logprobs = [], []
        # the prompt pass reads the last position only: the last layer skips the others
        width = ids.shape[1]
        last_column = torch.arange(ids.shape[0], device=ids.device) * width + width - 1
        for step in range(self.max_new_tokens):
            with last_layer_only_at(decoder, last_column) if step == 0 else nullcontext():
                hidden = decoder(
                    input_ids=feed, attention_mask=attn, position_ids=positions, past_key_values=cache, use_cache=True
                ).last_hidden_state[:, -1]
            logits = model.reasoning_logits(head(hidden)) / temperature
            token = logits.argmax(dim=-1) if greedy else self._sample(logits)
            logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, token.unsqueeze(1)).squeeze(1))
            token = torch.where(done, torch.full_like(token, model.pad_token_id), token)
            tokens.append(token)
            done |= torch.isin(token, stop)
            if bool(done.all()) or step == self.max_new_tokens - 1:
                break
            feed = token.unsqueeze(1)
            positions = positions[:, -1:] + 1
            if attn is not None:
                attn = torch.cat([attn, torch.ones_like(feed)], dim=1)
        return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1), cache

    def _sample(self, scaled_logits: torch.Tensor) -> torch.Tensor:
        """One token per row from softmax(scaled logits), restricted to the top-k."""
        if self.top_k and self.top_k < scaled_logits.shape[-1]:
            values, index = scaled_logits.topk(self.top_k, dim=-1)
            return index.gather(1, torch.multinomial(torch.softmax(values, dim=-1), 1)).squeeze(1)
        return torch.multinomial(torch.softmax(scaled_logits, dim=-1), 1).squeeze(1)

    def _finish(
        self, model: RecModel, mask: torch.Tensor, generated: torch.Tensor, token_lp: torch.Tensor, cache: Any
    ) -> Rollout:
        n, steps = generated.shape
        stop = torch.tensor(_stop_ids(model), device=generated.device)
        is_stop = torch.isin(generated, stop)
        any_stop = is_stop.any(dim=1)
        first_stop = torch.where(any_stop, is_stop.float().argmax(dim=1), torch.full_like(any_stop, steps, dtype=torch.long))
        stop_token = generated.gather(1, first_stop.clamp(max=max(steps - 1, 0)).unsqueeze(1)).squeeze(1)
        sampled_answer = any_stop & (stop_token == model.answer_token_id)

        reasoning, sampled, old_lp = [], [], []
        for row in range(n):
            keep = int(first_stop[row]) + int(sampled_answer[row])
            reasoning.append(generated[row, :keep].tolist())
            sampled.append(bool(sampled_answer[row]))
            old_lp.append(token_lp[row, :keep].cpu())

        if self.read_states:
            states = self._answer_step(model, mask, generated, first_stop, cache)
        else:
            states = torch.empty(n, 0)
        return Rollout(
            prompt_ids=[], reasoning_ids=reasoning, sampled_answer=sampled, old_logprobs=old_lp, user_states=states
        )

    @staticmethod
    def _answer_step(
        model: RecModel, mask: torch.Tensor, generated: torch.Tensor, n_reason: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Feed `<answer>` on top of the generation cache; return its hidden state.

        The cache holds every fed token: the prompt and all generated tokens but the
        last one. A row whose reasoning used all `steps` tokens still needs its last
        token fed, so then two tokens go in: [last generated token (or a masked pad for
        rows that stopped earlier), <answer>]; when no row did, `<answer>` alone does.
        Without any padding no mask is passed and the fused causal attention applies."""
        n, steps = generated.shape
        if steps == 0 or cache is None:
            raise RuntimeError("generation returned no steps or no KV cache; max_new_tokens must be >= 1")
        device = generated.device
        cols = torch.arange(steps, device=device).unsqueeze(0)
        reason_mask = (cols < n_reason.unsqueeze(1)).long()
        full_row = n_reason == steps  # its last reasoning token is not in the cache yet
        cached_reason = reason_mask[:, : steps - 1]
        answer = torch.full_like(generated[:, -1:], model.answer_token_id)
        if bool(full_row.any()):
            last_tok = torch.where(full_row, generated[:, -1], torch.full_like(generated[:, -1], model.pad_token_id))
            new_tokens = torch.cat([last_tok.unsqueeze(1), answer], dim=1)
            new_mask = torch.stack([full_row.long(), torch.ones_like(last_tok)], dim=1)
        else:
            new_tokens, new_mask = answer, torch.ones_like(answer)
        attn = torch.cat([mask, cached_reason, new_mask], dim=1)
        positions = position_ids_from_mask(attn)[:, -new_tokens.shape[1] :]
        decoder = model.lm.get_decoder()
        hidden = decoder(
            input_ids=new_tokens,
            attention_mask=None if bool(attn.all()) else attn,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        return hidden[:, -1].float().cpu()


class VLLMEngine:
    """vLLM sampling for GPU training (the `gpu` extra). Not exercised on CPU."""

    def __init__(self, model_ref: str, temperature: float, top_k: int, max_new_tokens: int, **llm_kwargs: Any) -> None:
        try:
            import vllm
        except ImportError as err:
            raise RuntimeError(
                "train.rollout.engine: vllm needs the optional GPU extra (pip install -e '.[gpu]') "
                "on a machine with a CUDA GPU; use engine: hf otherwise"
            ) from err
        self._vllm = vllm
        self.llm = vllm.LLM(model=model_ref, enable_prefix_caching=True, **llm_kwargs)
        self.temperature, self.top_k, self.max_new_tokens = temperature, top_k, max_new_tokens

    def sync_weights(self, model: RecModel) -> None:
        """Push the policy's current weights (LoRA merged in, out of place) into the vLLM engine."""
        weights = list(merged_weights(model.lm))
        self.llm.collective_rpc(_load_weights, args=(weights,))  # pragma: no cover
        # cached prompt blocks were computed with the old weights
        self.llm.reset_prefix_cache()  # pragma: no cover

    @torch.no_grad()
    def generate(
        self, model: RecModel, prompts: Sequence[Sequence[int]], *, group_size: int = 1, greedy: bool = False
    ) -> Rollout:  # pragma: no cover - needs a GPU
        sp = self._vllm.SamplingParams(
            n=group_size,
            temperature=0.0 if greedy else self.temperature,
            top_k=-1 if greedy or not self.top_k else self.top_k,
            max_tokens=self.max_new_tokens,
            stop_token_ids=_stop_ids(model),
            allowed_token_ids=(~model.banned_in_reasoning()).nonzero().flatten().tolist(),
        )
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sp)
        prompt_ids, reasoning, sampled = [], [], []
        for p, o in zip(prompts, outs, strict=True):
            for c in o.outputs:
                toks = list(c.token_ids)
                ans = bool(toks) and toks[-1] == model.answer_token_id
                if toks and not ans and toks[-1] in _stop_ids(model):
                    toks = toks[:-1]
                prompt_ids.append(list(p))
                reasoning.append(toks)
                sampled.append(ans)
        # vLLM's own log-probs are those of the raw logits (no temperature, no banned
        # tokens); the update needs the masked, tempered ones, which one forward of the
        # policy gives together with h_u
        return score_trajectories(model, prompt_ids, reasoning, sampled, self.temperature)


def _load_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:  # pragma: no cover
    """Runs on each vLLM worker (`LLM.collective_rpc` passes the worker as the first
    argument): the model there loads the (name, tensor) pairs."""
    worker.model_runner.model.load_weights(weights=weights)


def reasoning_logprobs(
    model: RecModel,
    sequences: list[list[int]],
    n_trained: list[int],
    appended: list[bool],
    temperature: float,
    forward: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over whole trajectories (`prompt + reasoning + <answer>`, left-padded so
    all end in the last column): the log-probs of each row's `n_trained` reasoning tokens
    under `log_softmax(masked logits / temperature)`, [n, K] right-aligned (row r's in
    its last n_trained[r] columns), their mask [n, K], and the final hidden state at the
    last token, [n, d]. `appended[r]`: the row's final `<answer>` was appended, not
    sampled, so it is not among the trained tokens. `forward` is the module to call
    (a DDP-wrapped policy; default `model`); only the last K + 1 columns' logits are
    computed."""
    ids, attn = model.pad(sequences, padding_side="left")
    tail = [int(a) for a in appended]
    k = max(n_trained)
    span = k + max(tail)
    out = (forward or model)(ids, attn, output="lm", logits_to_keep=span + 1)
    # column c predicts token c + 1; the same special-token mask as the rollout's
    logits = model.reasoning_logits(out.logits[:, :-1]) / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, -span:].unsqueeze(2)).squeeze(2)
    aligned = torch.zeros(len(sequences), k, device=logp.device)
    mask = torch.zeros(len(sequences), k, device=logp.device)
    for r, (nt, tl) in enumerate(zip(n_trained, tail, strict=True)):
        if nt:
            end = span - tl  # exclusive end, in the `span` window, of the trained tokens
            aligned[r, k - nt :] = logp[r, end - nt : end]
            mask[r, k - nt :] = 1.0
    return aligned, mask, out.hidden_states[-1][:, -1]


@torch.no_grad()
def score_trajectories(
    model: RecModel,
    prompt_ids: list[list[int]],
    reasoning_ids: list[list[int]],
    sampled_answer: list[bool],
    temperature: float,
    batch_size: int = 32,
) -> Rollout:
    """A Rollout for trajectories written elsewhere (vLLM): each reasoning token's
    log-prob under `log_softmax(masked logits / temperature)` and `h_u` at the final
    `<answer>`, from one no-grad forward of the policy over `prompt + reasoning + <answer>`."""
    roll = Rollout(prompt_ids, reasoning_ids, sampled_answer, [], torch.empty(0))
    seqs = roll.sequences(model.answer_token_id)
    states = []
    for start in range(0, len(seqs), batch_size):
        rows = range(start, min(start + batch_size, len(seqs)))
        n_trained = [len(reasoning_ids[r]) for r in rows]
        logp, _, hidden = reasoning_logprobs(
            model, [seqs[r] for r in rows], n_trained, [not sampled_answer[r] for r in rows], temperature
        )
        k = logp.shape[1]
        roll.old_logprobs.extend(logp[j, k - nt :].float().cpu() for j, nt in enumerate(n_trained))
        states.append(hidden.float().cpu())
    roll.user_states = torch.cat(states) if states else torch.empty(0, model.hidden_size)
    return roll


def make_engine(engine: str, *, temperature: float, top_k: int, max_new_tokens: int, model_ref: str | None = None, batch_size: int = 64) -> RolloutEngine:
    if engine == "hf":
        return HFEngine(temperature, top_k, max_new_tokens, batch_size=batch_size)
    if engine == "vllm":
        if model_ref is None:
            raise ValueError("the vllm engine needs the backbone reference (a Hub id or a local path)")
        return VLLMEngine(model_ref, temperature, top_k, max_new_tokens)
    raise ValueError(f"train.rollout.engine: unknown engine {engine!r} (hf or vllm)")


def policy_user_states(
    rec: RecModel,
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    reasoning: bool,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
    share_head: bool = True,
) -> tuple[torch.Tensor, list[list[int]]]:
    """User states [N, d] (float32, cpu) and the reasoning token ids of each user.

    Batches are formed over prompts sorted by length, so padding stays small. The head
    all the prompts share (chat template, instruction, the history's header) is encoded
    once, with the current weights, and every batch runs only what follows it
    (`share_head=False`: every prompt from its first token, for comparisons)."""
    prompts = rec.user_prompt_ids(conversations, answer=not reasoning)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    states = torch.empty(len(prompts), rec.hidden_size)
    texts: list[list[int]] = [[] for _ in prompts]
    engine = HFEngine(temperature=1.0, top_k=0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    was_training = rec.training
    rec.eval()
    try:
        with torch.no_grad():
            n_shared = shared_prefix_length(prompts) if share_head and len(prompts) > 1 else 0
            prefix = rec.shared_prefix(prompts[0][:n_shared]) if n_shared else None
            for start in tqdm(range(0, len(order), batch_size), desc="user states", disable=not progress, leave=False):
                idx = order[start : start + batch_size]
                batch = [prompts[i] for i in idx]
                if reasoning:
                    roll = engine.generate(rec, batch, group_size=1, greedy=True, prefix=prefix)
                    out = roll.user_states
                    for j, i in enumerate(idx):
                        texts[i] = roll.reasoning_ids[j]
                else:
                    out = (rec.encode_after_prefix(prefix, batch) if prefix else rec.encode(batch)).float().cpu()
                states[idx] = out
    finally:
        rec.train(was_training)
    return states, texts
