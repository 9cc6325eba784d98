"""Next-token choice per row: greedy exactly as HF `generate(do_sample=False)`, or seeded sampling.

The backbone's forced tokens (generation_config.forced_bos_token_id / forced_eos_token_id) are applied
where HF applies them, so greedy output matches HF and PEFT token for token.
"""

from __future__ import annotations

import torch

from server.engine.backbone import GenerationRules
from server.engine.request import Request


def forced_token(request: Request, rules: GenerationRules, is_encoder_decoder: bool) -> int | None:
    """The token HF's forced-BOS/EOS logits processors would force at this step, if any."""
    num_out = len(request.output_token_ids)
    forced = None
    # HF: ForcedBOS at cur_len == 1 (cur_len counts the decoder input: [start] for seq2seq, the prompt otherwise)
    cur_len = num_out + (1 if is_encoder_decoder else len(request.prompt_token_ids))
    if rules.forced_bos_token_id is not None and cur_len == 1:
        forced = rules.forced_bos_token_id
    # HF: ForcedEOS at cur_len == max_length - 1, i.e. the last token the budget allows
    is_last = num_out == request.params.max_new_tokens - 1
    if rules.forced_eos_token_id is not None and not request.params.ignore_eos and is_last:
        forced = rules.forced_eos_token_id
    return forced


def _sample_row(logits: torch.Tensor, request: Request, generator: torch.Generator) -> int:
    """logits [vocab] float32 -> one id: temperature, then top-k, then top-p (HF's warper order)."""
    params = request.params
    scores = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)
        remove[-1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = scores.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


class Sampler:
    def __init__(self, rules: GenerationRules, is_encoder_decoder: bool, device: torch.device):
        self.rules = rules
        self.is_encoder_decoder = is_encoder_decoder
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator:
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            if request.params.seed is not None:
                generator.manual_seed(request.params.seed)
            else:
                generator.seed()
            self._generators[request.request_id] = generator
        return generator

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits [n, vocab] float32, one row per request -> n token ids."""
        chosen = logits.argmax(dim=-1).tolist()  # greedy rows; one device->host sync for the batch
        for i, request in enumerate(requests):
            forced = forced_token(request, self.rules, self.is_encoder_decoder)
            if forced is not None:
                chosen[i] = forced
            elif not request.params.is_greedy:
                chosen[i] = _sample_row(logits[i], request, self._generator(request))
        return chosen
