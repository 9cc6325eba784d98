"""Where the prefix enters: the trainer's forward against PEFT (GPT-2, BART decoder) and against an attention
written out by hand (BART encoder, decoder and cross prefixes together)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PrefixTuningConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save as st_save
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from prefix_store.format import import_peft
from trainer.backbone import Features, load_backbone
from trainer.data import Example
from trainer.decode import beam_search, greedy

PROMPTS = [
    "name : Blue Spice | Type : coffee shop",
    "the quick brown fox",
    "Aarhus Airport : cityServed : Aarhus",
]


def _peft_pair(model, task_type: str, num_tokens: int = 4):
    torch.manual_seed(1)
    peft_model = get_peft_model(
        model, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_tokens)
    ).eval()
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0.0, 1.0)
    config = json.dumps(peft_model.peft_config["default"].to_dict(), default=str).encode()
    weights = st_save({k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()})
    return peft_model, import_peft(config, weights)


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def test_gpt2_greedy_matches_peft(tiny_gpt2_dir: Path) -> None:
    backbone = load_backbone(tiny_gpt2_dir)
    peft_model, prefix = _peft_pair(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), "CAUSAL_LM")
    eos = backbone.eos_token_id
    for prompt in PROMPTS:
        ids = backbone.prompt_ids(prompt, None)
        out = peft_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=12, do_sample=False, pad_token_id=eos)  # fmt: skip
        expected = _until_eos(out[0, len(ids) :].tolist(), eos)
        assert greedy(backbone, prefix.targets, ids, 12) == expected


def test_bart_decoder_prefix_greedy_matches_peft(tiny_bart_dir: Path) -> None:
    backbone = load_backbone(tiny_bart_dir)
    peft_model, prefix = _peft_pair(AutoModelForSeq2SeqLM.from_pretrained(tiny_bart_dir), "SEQ_2_SEQ_LM")
    eos = backbone.eos_token_id
    for prompt in PROMPTS:
        ids = backbone.prompt_ids(prompt, None)
        out = peft_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=10, do_sample=False)  # fmt: skip
        expected = _until_eos(out[0, 1:].tolist(), eos)  # drop decoder_start_token_id
        assert greedy(backbone, prefix.targets, ids, 10) == expected


def _by_hand_bart_logits(
    model, prefix: dict[str, torch.Tensor], source: list[int], decoder: list[int]
) -> torch.Tensor:
    """Eager BART with the three prefixes, one sequence, from the module weights: [T, V]."""
    m, num_tokens = model.model, prefix["decoder"].shape[3]

    def attend(attn, queries, keys_from, extra, causal: bool) -> torch.Tensor:
        heads = attn.num_heads

        def split(x):
            return x.view(-1, heads, attn.head_dim).transpose(0, 1)  # [H, T, d]

        q, k, v = split(attn.q_proj(queries)), split(attn.k_proj(keys_from)), split(attn.v_proj(keys_from))
        k, v = torch.cat([extra[0], k], dim=1), torch.cat([extra[1], v], dim=1)
        scores = q @ k.transpose(1, 2) * attn.scaling  # [H, Tq, P + Tk]
        if causal:  # query i (position P + i) sees the P prefix entries and tokens 0..i
            allowed = torch.arange(k.shape[1])[None, :] <= num_tokens + torch.arange(q.shape[1])[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(q.shape[1], -1)
        return attn.out_proj(out)

    src, dec = torch.tensor(source), torch.tensor(decoder)
    pos = m.encoder.embed_positions
    h = m.encoder.embed_tokens(src) + torch.nn.Embedding.forward(pos, torch.arange(len(source)) + pos.offset)
    h = m.encoder.layernorm_embedding(h)
    for index, layer in enumerate(m.encoder.layers):
        h = layer.self_attn_layer_norm(h + attend(layer.self_attn, h, h, prefix["encoder"][index], False))
        h = layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))
    encoded = h
    pos = m.decoder.embed_positions
    positions = num_tokens + torch.arange(len(decoder))  # decoder tokens start at P
    h = m.decoder.embed_tokens(dec) + torch.nn.Embedding.forward(pos, positions + pos.offset)
    h = m.decoder.layernorm_embedding(h)
    for index, layer in enumerate(m.decoder.layers):
        h = layer.self_attn_layer_norm(h + attend(layer.self_attn, h, h, prefix["decoder"][index], True))
        h = layer.encoder_attn_layer_norm(
            h + attend(layer.encoder_attn, h, encoded, prefix["cross"][index], False)
        )
        h = layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))
    return model.lm_head(h) + model.final_logits_bias[0]


def test_bart_three_prefixes_match_attention_by_hand(tiny_bart_dir: Path) -> None:
    backbone = load_backbone(tiny_bart_dir)
    torch.manual_seed(2)
    shape = backbone.shape
    prefix = {
        t: torch.randn(shape.num_layers, 2, shape.num_heads, 3, shape.head_dim) for t in backbone.targets
    }
    examples = [Example(PROMPTS[0], "The Blue Spice coffee shop ."), Example(PROMPTS[1], "a fox")]
    batch = backbone.collate([backbone.featurize(ex, "{source}") for ex in examples])  # padded batch of two
    with torch.no_grad():
        logits = backbone.logits(batch, prefix)
        for row, ex in enumerate(examples):
            source = backbone.prompt_ids(ex.source, None)
            length = len(backbone.tokenizer(ex.target)["input_ids"])
            decoder = batch["decoder_input_ids"][row, :length].tolist()
            expected = _by_hand_bart_logits(backbone.model, prefix, source, decoder)
            torch.testing.assert_close(logits[row, :length], expected, rtol=1e-4, atol=1e-4)


def test_incremental_decoding_matches_teacher_forcing(tiny_bart_dir: Path, tiny_gpt2_dir: Path) -> None:
    """The decoding path (prefilled cache, one token a step) and the training path give the same logits."""
    for path in (tiny_gpt2_dir, tiny_bart_dir):
        backbone = load_backbone(path)
        torch.manual_seed(3)
        s = backbone.shape
        prefix = {t: torch.randn(s.num_layers, 2, s.num_heads, 4, s.head_dim) for t in backbone.targets}
        prompt = backbone.prompt_ids(PROMPTS[0], backbone.default_template())
        continuation = torch.randint(5, 100, (6,)).tolist()
        batch = backbone.collate([Features(prompt, continuation)])
        with torch.no_grad():
            forced = backbone.logits(batch, prefix)[0]
            state, logits = backbone.begin(prefix, prompt, num_beams=2)
            stepped = [logits[0]]
            for token in continuation[:-1]:
                stepped.append(backbone.step(state, torch.tensor([token, token]), torch.tensor([1, 0]))[0])
        if backbone.model_type == "gpt2":
            forced = forced[len(prompt) - 1 : len(prompt) + len(continuation) - 1]
        torch.testing.assert_close(torch.stack(stepped), forced, rtol=1e-4, atol=1e-4)
        assert beam_search(backbone, prefix, prompt, 8, num_beams=1) == greedy(backbone, prefix, prompt, 8)
