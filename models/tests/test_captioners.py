"""Captioner exports (BLIP-2, ViT-GPT2): the ONNX graphs against transformers, plain-Python greedy
and beam search over the graphs against the committed `generate` references, the fixtures against
their generators, and exports from save_pretrained directories (fp32, fp16, a user's own shapes).

The decoding loops here are deliberately literal: they are the recipe the Rust decoder implements
(models/README.md), checked against transformers' own token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cip_export import blip2, test_images, vit_gpt2  # noqa: E402
from cip_export.common import MANIFEST, directory_digest, file_blake3  # noqa: E402
from cip_export.gpt2_tokenizer import gpt2_tokenizer, learn_merges, CORPUS  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
BLIP2_DIR = FIXTURES / "blip2-tiny"
VIT_GPT2_DIR = FIXTURES / "vit-gpt2-tiny"
REFERENCE = FIXTURES / "reference"


def sessions(model_dir: Path, roles: list[str]) -> dict[str, ort.InferenceSession]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return {r: ort.InferenceSession(str(model_dir / r / "model.onnx"), options) for r in roles}


def float_type(session: ort.InferenceSession, name: str):
    """numpy dtype of a float input (fp16 exports take float16 embeddings and caches)."""
    kind = next(i.type for i in session.get_inputs() if i.name == name)
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}[kind]


def manifest(model_dir: Path) -> dict:
    with open(model_dir / MANIFEST, "rb") as f:
        return tomllib.load(f)


def reference_index(family: str) -> dict:
    return json.loads((REFERENCE / family / "index.json").read_text())


def reference_tensors(family: str) -> dict[str, np.ndarray]:
    return load_file(str(REFERENCE / family / "inputs.safetensors"))


# ---------------------------------------------------------------------------------------------
# The decoding loop (greedy, with the logits processors the references use)


def initial_positions(attention_mask: np.ndarray) -> np.ndarray:
    """transformers 5 generate: cumsum(mask) - 1, padding positions set to 0."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions[attention_mask == 0] = 0
    return positions


def process_logits(scores: np.ndarray, sequences: np.ndarray, new_tokens: int, kwargs: dict, eos_ids) -> np.ndarray:
    """repetition_penalty, no_repeat_ngram_size and min_new_tokens as transformers applies them,
    over the whole sequence so far (prefix included)."""
    scores = scores.copy()
    penalty = kwargs.get("repetition_penalty", 1.0)
    if penalty != 1.0:
        for row, seq in enumerate(sequences):
            seen = np.unique(seq)
            picked = scores[row, seen]
            scores[row, seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    n = kwargs.get("no_repeat_ngram_size", 0)
    if n and sequences.shape[1] + 1 >= n:
        for row, seq in enumerate(sequences.tolist()):
            tail = tuple(seq[len(seq) - n + 1:])
            for start in range(len(seq) - n + 1):
                if tuple(seq[start:start + n - 1]) == tail:
                    scores[row, seq[start + n - 1]] = -np.inf
    if new_tokens < kwargs.get("min_new_tokens", 0):
        scores[:, list(eos_ids)] = -np.inf
    return scores


def greedy(step, first_input, prefix_ids, attention_mask, positions, past, kwargs, eos_ids, pad_id, embed=None):
    """Greedy search with a key/value cache and per-row stopping, as transformers' generate.

    step(token_input, attention_mask, position_ids, past) -> (logits, presents). Finished rows keep
    running with pad_token_id (their outputs are discarded), as in transformers.
    """
    sequences = prefix_ids.copy()
    finished = np.zeros(len(prefix_ids), dtype=bool)
    token_input = first_input
    for new_tokens in range(kwargs["max_new_tokens"]):
        logits, past = step(token_input, attention_mask, positions, past)
        scores = process_logits(logits[:, -1].astype(np.float64), sequences, new_tokens, kwargs, eos_ids)
        next_tokens = np.where(finished, pad_id, scores.argmax(axis=-1))
        sequences = np.concatenate([sequences, next_tokens[:, None]], axis=1)
        finished |= np.isin(next_tokens, list(eos_ids))
        if finished.all():
            break
        attention_mask = np.concatenate([attention_mask, np.ones((len(sequences), 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        token_input = next_tokens[:, None].astype(np.int64)
        if embed is not None:
            token_input = embed(token_input)
    return sequences


def beam_search(step, first_input, prefix_ids, attention_mask, positions, past, kwargs, eos_ids, pad_id,
                embed=None):
    """transformers 5's (vectorised) beam search, step for step, over the exported graphs.

    Per batch item: keep 2 * num_beams candidates per step; candidates that end (EOS, or the
    maximum length) enter the finished set with score sum_logprobs / generated_len ** length_penalty
    if among the top num_beams; the others continue. The cache is reordered by source beam. Stops by
    transformers' early-stopping heuristic. Returns the best finished hypothesis per item.
    """
    num_beams = kwargs["num_beams"]
    length_penalty = kwargs.get("length_penalty", 1.0)
    early_stopping = kwargs.get("early_stopping", False)
    batch, prompt_len = prefix_ids.shape
    max_length = prompt_len + kwargs["max_new_tokens"]
    keep = max(2, 1 + len(eos_ids)) * num_beams
    top_num_beam_mask = np.arange(keep) < num_beams

    def expand(x):
        return np.repeat(x, num_beams, axis=0)

    token_input, attention_mask, positions = expand(first_input), expand(attention_mask), expand(positions)
    past = [expand(p) for p in past]
    running = np.full((batch, num_beams, max_length), pad_id, dtype=np.int64)
    running[:, :, :prompt_len] = prefix_ids[:, None, :]
    running_scores = np.zeros((batch, num_beams), np.float32)
    running_scores[:, 1:] = -1e9
    finished = running.copy()
    finished_scores = np.full((batch, num_beams), -1e9, np.float32)
    finished_lengths = np.zeros((batch, num_beams), np.int64)
    is_finished = np.zeros((batch, num_beams), bool)
    improvable = np.ones((batch, 1), bool)
    cur_len = prompt_len
    while True:
        logits, past = step(token_input, attention_mask, positions, past)
        log_probs = torch.log_softmax(torch.from_numpy(logits[:, -1].astype(np.float32)), dim=-1).numpy()
        flat = running.reshape(batch * num_beams, max_length)[:, :cur_len]
        log_probs = process_logits(log_probs, flat, cur_len - prompt_len, kwargs, eos_ids).astype(np.float32)
        vocab = log_probs.shape[-1]
        total = (log_probs.reshape(batch, num_beams, vocab) + running_scores[:, :, None]).reshape(batch, -1)
        top_scores, top_index = torch.topk(torch.from_numpy(total), k=keep)
        top_scores, top_index = top_scores.numpy(), top_index.numpy()
        source_beam, token = top_index // vocab, top_index % vocab
        candidates = np.take_along_axis(running, source_beam[:, :, None], axis=1)
        candidates[:, :, cur_len] = token
        hits = np.isin(token, list(eos_ids)) | (cur_len + 1 >= max_length)

        # Candidates that continue.
        continuing = top_scores + hits.astype(np.float32) * np.float32(-1e9)
        chosen = torch.topk(torch.from_numpy(continuing), k=num_beams)[1].numpy()
        running = np.take_along_axis(candidates, chosen[:, :, None], axis=1)
        running_scores = np.take_along_axis(continuing, chosen, axis=1)
        reorder = (np.take_along_axis(source_beam, chosen, axis=1) + np.arange(batch)[:, None] * num_beams).reshape(-1)

        # Candidates that finish.
        normalised = top_scores / np.float32((cur_len + 1 - prompt_len) ** length_penalty)
        full = is_finished.all(axis=1, keepdims=True) & (early_stopping is True)
        normalised = normalised + full * np.float32(-1e9) + (~improvable) * np.float32(-1e9)
        just_finished = hits & top_num_beam_mask[None, :]
        normalised = normalised + (~just_finished) * np.float32(-1e9)
        merged = np.concatenate([finished, candidates], axis=1)
        merged_scores = np.concatenate([finished_scores, normalised], axis=1)
        merged_lengths = np.concatenate([finished_lengths, np.full(candidates.shape[:2], cur_len + 1 - prompt_len)], axis=1)
        merged_finished = np.concatenate([is_finished, just_finished], axis=1)
        best = torch.topk(torch.from_numpy(merged_scores), k=num_beams)[1].numpy()
        finished = np.take_along_axis(merged, best[:, :, None], axis=1)
        finished_scores = np.take_along_axis(merged_scores, best, axis=1)
        finished_lengths = np.take_along_axis(merged_lengths, best, axis=1)
        is_finished = np.take_along_axis(merged_finished, best, axis=1)

        past = [p[reorder] for p in past]
        cur_len += 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_length - prompt_len
        else:
            best_length = cur_len - prompt_len
        best_running = running_scores[:, :1] / np.float32(best_length ** length_penalty)
        worst_finished = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), np.float32(-1e9))
        improvable = improvable & (best_running > worst_finished).any(axis=-1, keepdims=True)
        open_beams = not (is_finished.all() and early_stopping is True)
        if not (improvable.any() and open_beams and not hits.all()):
            break
        attention_mask = np.concatenate([attention_mask, np.ones((len(attention_mask), 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        token_input = running[:, :, cur_len - 1].reshape(-1, 1)
        if embed is not None:
            token_input = embed(token_input)
    length = prompt_len + finished_lengths[:, 0].max()
    return finished[:, 0, :length]


def pad_to(sequences: np.ndarray, length: int, pad_id: int) -> np.ndarray:
    """generate stops when every row is done; the reference output is then shorter than
    prefix + max_new_tokens only in that case, so compare on the reference's length."""
    if sequences.shape[1] >= length:
        return sequences[:, :length]
    return np.pad(sequences, ((0, 0), (0, length - sequences.shape[1])), constant_values=pad_id)


# ---------------------------------------------------------------------------------------------
# BLIP-2


class Blip2Graphs:
    def __init__(self, model_dir: Path):
        self.config = manifest(model_dir)["config"]
        self.s = sessions(model_dir, ["vision", "embed", "decoder"])
        self.layers = self.config["num_layers"]
        self.cache_dtype = float_type(self.s["decoder"], "past_key_values.0.key")

    def query_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.s["vision"].run(None, {"pixel_values": pixel_values})[0]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.s["embed"].run(None, {"input_ids": ids.astype(np.int64)})[0]

    def prefix_embeds(self, prefix_ids: np.ndarray, query_embeds: np.ndarray) -> np.ndarray:
        """Token embeddings with the query embeddings written over the <image> positions, in order."""
        embeds = self.embed(prefix_ids)
        image = prefix_ids == self.config["image_token_index"]
        assert (image.sum(axis=1) == self.config["num_query_tokens"]).all()
        embeds[image] = query_embeds.reshape(-1, query_embeds.shape[-1])
        return embeds

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.config["num_heads"], 0, self.config["head_dim"])
        return [np.zeros(shape, self.cache_dtype) for _ in range(2 * self.layers)]

    def step(self, inputs_embeds, attention_mask, position_ids, past):
        feeds = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "position_ids": position_ids}
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        outputs = self.s["decoder"].run(None, feeds)
        return outputs[0], outputs[1:]

    def greedy(self, pixel_values, prefix_ids, prefix_mask, kwargs) -> np.ndarray:
        embeds = self.prefix_embeds(prefix_ids, self.query_embeds(pixel_values))
        search = greedy if kwargs.get("num_beams", 1) == 1 else beam_search
        return search(self.step, embeds, prefix_ids, prefix_mask, initial_positions(prefix_mask),
                      self.empty_past(len(prefix_ids)), kwargs, self.config["eos_token_id"],
                      self.config["pad_token_id"], embed=self.embed)


@pytest.fixture(scope="module")
def blip2_graphs() -> Blip2Graphs:
    return Blip2Graphs(BLIP2_DIR)


@pytest.fixture(scope="module")
def blip2_hf():
    """The tiny model as the generator builds it (same weights as the committed fixture)."""
    processor = blip2.tiny_processor()
    return blip2.tiny_model(processor), processor


def test_blip2_manifest_describes_graphs_and_recipe(blip2_hf):
    model, processor = blip2_hf
    m = manifest(BLIP2_DIR)
    assert (m["family"], m["dtype"]) == ("blip2", "fp32")
    graphs = m["graphs"]
    assert [i["name"] for i in graphs["vision"]["inputs"]] == ["pixel_values"]
    assert graphs["vision"]["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert graphs["vision"]["outputs"][0] == {"name": "query_embeds", "dtype": "float32", "shape": ["batch", 4, 32]}
    assert graphs["embed"]["outputs"][0]["shape"] == ["batch", "sequence", 32]
    decoder_inputs = {i["name"]: i for i in graphs["decoder"]["inputs"]}
    assert list(decoder_inputs)[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert decoder_inputs["attention_mask"]["shape"] == ["batch", "total_sequence"]
    assert decoder_inputs["past_key_values.1.value"]["shape"] == ["batch", 4, "past_sequence", 8]
    outputs = {o["name"]: o for o in graphs["decoder"]["outputs"]}
    assert outputs["logits"]["shape"] == ["batch", "sequence", len(processor.tokenizer)]
    assert outputs["present.0.key"]["shape"] == ["batch", 4, "total_sequence", 8]
    c = m["config"]
    assert c["image_token_index"] == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert c["eos_token_id"] == [processor.tokenizer.convert_tokens_to_ids("Ċ")]
    assert (c["bos_token_id"], c["pad_token_id"]) == (model.config.text_config.bos_token_id, 1)
    assert c["num_query_tokens"] == 4 and c["prompt_padding_side"] == "left"
    assert c["generation"]["max_length"] == 20 and c["generation"]["num_beams"] == 1
    assert (c["resample"], c["image_height"], c["do_convert_rgb"]) == ("bicubic", 32, True)
    assert c["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


@pytest.mark.parametrize("model_dir", [BLIP2_DIR, VIT_GPT2_DIR], ids=["blip2", "vit-gpt2"])
def test_manifest_digest_matches_files(model_dir):
    m = manifest(model_dir)
    on_disk = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                     if p.is_file() and p.name != MANIFEST)
    assert [f["path"] for f in m["files"]] == on_disk
    for f in m["files"]:
        assert file_blake3(model_dir / f["path"]) == f["blake3"], f["path"]
    assert directory_digest(m["files"]) == m["digest"]["blake3"]


def test_blip2_graphs_match_transformers_forward(blip2_graphs, blip2_hf):
    model, processor = blip2_hf
    tensors = reference_tensors("blip2")
    pixel_values = tensors["five.pixel_values"]
    with torch.no_grad():
        expected_query = blip2._query_embeds(model, torch.from_numpy(pixel_values)).numpy()
    query = blip2_graphs.query_embeds(pixel_values)
    np.testing.assert_allclose(query, expected_query, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(query, tensors["five.query_embeds"], rtol=1e-4, atol=1e-4)

    # Full-prefix logits with padded prompts, against transformers' forward (pad rows excluded).
    ids, mask = blip2.generate_prefix(model, processor, blip2.MIXED_PROMPTS, 5)
    ids, mask = ids.numpy(), mask.numpy()
    embeds = blip2_graphs.prefix_embeds(ids, query)
    logits, _ = blip2_graphs.step(embeds, mask, initial_positions(mask), blip2_graphs.empty_past(5))
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(pixel_values), input_ids=torch.from_numpy(ids),
                         attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(logits[:, -1], tensors["five.mixed.prefix_last_logits"], rtol=1e-3, atol=1e-3)

    # The cache: the same prefix fed in two pieces gives the same last logits.
    split = 6
    head, present = blip2_graphs.step(embeds[:, :split], mask[:, :split], initial_positions(mask)[:, :split],
                                      blip2_graphs.empty_past(5))
    tail, _ = blip2_graphs.step(embeds[:, split:], mask, initial_positions(mask)[:, split:], present)
    np.testing.assert_allclose(tail, logits[:, split:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head[real[:, :split]], logits[:, :split][real[:, :split]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", reference_index("blip2")["cases"], ids=lambda c: c["name"])
def test_blip2_decoding_loop_reproduces_generate(blip2_graphs, case):
    tensors = reference_tensors("blip2")
    prefix_ids = np.array(case["prefix_ids"], dtype=np.int64)
    prefix_mask = np.array(case["prefix_attention_mask"], dtype=np.int64)
    got = blip2_graphs.greedy(tensors[case["pixel_values"]], prefix_ids, prefix_mask, case["generate_kwargs"])
    expected = np.array(case["output_ids"])
    np.testing.assert_array_equal(pad_to(got, expected.shape[1], blip2_graphs.config["pad_token_id"]), expected)


def test_blip2_references_cover_the_recipe():
    """The committed cases contain what the decoder must handle: left padding inside the prefix,
    rows stopping at different steps, and the processor's prefix equal to the documented one."""
    cases = {c["name"]: c for c in reference_index("blip2")["cases"]}
    mixed = np.array(cases["greedy_five_mixed"]["prefix_attention_mask"])
    assert (mixed[:, :4] == 1).all() and (mixed == 0).any()
    assert len(cases["greedy_one_none"]["output_ids"]) == 1 and len(cases["greedy_five_none"]["output_ids"]) == 5
    assert cases["beam3_five_none_length_penalty2"]["generate_kwargs"]["length_penalty"] == 2.0
    processor = blip2.tiny_processor()
    tokenizer = processor.tokenizer
    photo = cases["greedy_one_photo"]
    assert photo["prefix_ids"][0][4:] == tokenizer(test_images.PROMPT)["input_ids"]
    for case in cases.values():
        new = np.array(case["new_ids"])
        assert new.shape[1] <= case["generate_kwargs"]["max_new_tokens"]
        assert processor.batch_decode(case["output_ids"], skip_special_tokens=True) == case["texts"]


# ---------------------------------------------------------------------------------------------
# ViT-GPT2


class VitGpt2Graphs:
    def __init__(self, model_dir: Path):
        self.config = manifest(model_dir)["config"]
        self.s = sessions(model_dir, ["encoder", "decoder"])
        self.layers = self.config["num_layers"]
        self.cache_dtype = float_type(self.s["decoder"], "past_key_values.0.key")

    def encode(self, pixel_values: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        outputs = self.s["encoder"].run(None, {"pixel_values": pixel_values})
        return outputs[0], outputs[1:]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.config["num_heads"], 0, self.config["head_dim"])
        return [np.zeros(shape, self.cache_dtype) for _ in range(2 * self.layers)]

    def stepper(self, cross: list[np.ndarray]):
        def step(input_ids, attention_mask, position_ids, past):
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            for i in range(self.layers):
                feeds[f"past_key_values.{i}.key"] = past[2 * i]
                feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
                feeds[f"cross_attention.{i}.key"] = cross[2 * i]
                feeds[f"cross_attention.{i}.value"] = cross[2 * i + 1]
            outputs = self.s["decoder"].run(None, feeds)
            return outputs[0], outputs[1:]
        return step

    def greedy(self, pixel_values, prefix_ids, kwargs) -> np.ndarray:
        _, cross = self.encode(pixel_values)
        mask = np.ones_like(prefix_ids)
        search = greedy if kwargs.get("num_beams", 1) == 1 else beam_search
        cross = [np.repeat(c, kwargs.get("num_beams", 1), axis=0) for c in cross]
        return search(self.stepper(cross), prefix_ids, prefix_ids, mask, initial_positions(mask),
                      self.empty_past(len(prefix_ids)), kwargs, self.config["eos_token_id"],
                      self.config["pad_token_id"])


@pytest.fixture(scope="module")
def vit_gpt2_graphs() -> VitGpt2Graphs:
    return VitGpt2Graphs(VIT_GPT2_DIR)


@pytest.fixture(scope="module")
def vit_gpt2_hf():
    tokenizer = gpt2_tokenizer()
    return vit_gpt2.tiny_model(tokenizer), tokenizer


def test_vit_gpt2_manifest_describes_graphs(vit_gpt2_hf):
    model, tokenizer = vit_gpt2_hf
    m = manifest(VIT_GPT2_DIR)
    assert m["family"] == "vit-gpt2"
    encoder = m["graphs"]["encoder"]
    assert [o["name"] for o in encoder["outputs"]] == [
        "encoder_hidden_states", "cross_attention.0.key", "cross_attention.0.value",
        "cross_attention.1.key", "cross_attention.1.value"]
    assert encoder["outputs"][0]["shape"] == ["batch", 17, 24]
    assert encoder["outputs"][1]["shape"] == ["batch", 4, 17, 8]
    decoder_inputs = [i["name"] for i in m["graphs"]["decoder"]["inputs"]]
    assert decoder_inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "cross_attention.1.value" in decoder_inputs and "past_key_values.1.value" in decoder_inputs
    c = m["config"]
    eos = tokenizer.eos_token_id
    assert (c["decoder_start_token_id"], c["eos_token_id"], c["pad_token_id"]) == (eos, [eos], eos)
    assert c["vocab_size"] == len(tokenizer) and c["encoder_sequence_length"] == 17
    assert (c["resample"], c["do_convert_rgb"], c["image_mean"]) == ("bilinear", False, [0.5, 0.5, 0.5])


def test_vit_gpt2_graphs_match_transformers_forward(vit_gpt2_graphs, vit_gpt2_hf):
    model, tokenizer = vit_gpt2_hf
    tensors = reference_tensors("vit-gpt2")
    pixel_values = tensors["five.pixel_values"]
    encoder_hidden_states, cross = vit_gpt2_graphs.encode(pixel_values)
    with torch.no_grad():
        expected_hidden = model.encoder(pixel_values=torch.from_numpy(pixel_values)).last_hidden_state
        projected = model.enc_to_dec_proj(expected_hidden)
        block = model.decoder.transformer.h[1].crossattention
        expected_value = block.c_attn(projected).split(block.split_size, dim=2)[1]
    np.testing.assert_allclose(encoder_hidden_states, expected_hidden.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(encoder_hidden_states, tensors["five.encoder_hidden_states"], rtol=1e-4, atol=1e-4)
    expected_value = expected_value.view(5, 17, 4, 8).transpose(1, 2).numpy()
    np.testing.assert_allclose(cross[3], expected_value, rtol=1e-4, atol=1e-4)

    prefix = vit_gpt2.generate_prefix(model, tokenizer, test_images.PROMPT, 5).numpy()
    mask = np.ones_like(prefix)
    step = vit_gpt2_graphs.stepper(cross)
    logits, _ = step(prefix, mask, initial_positions(mask), vit_gpt2_graphs.empty_past(5))
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(pixel_values), decoder_input_ids=torch.from_numpy(prefix)).logits
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(logits[:, -1], tensors["five.photo.prefix_last_logits"], rtol=1e-3, atol=1e-3)
    head, present = step(prefix[:, :2], mask[:, :2], initial_positions(mask)[:, :2], vit_gpt2_graphs.empty_past(5))
    tail, _ = step(prefix[:, 2:], mask, initial_positions(mask)[:, 2:], present)
    np.testing.assert_allclose(np.concatenate([head, tail], axis=1), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", reference_index("vit-gpt2")["cases"], ids=lambda c: c["name"])
def test_vit_gpt2_decoding_loop_reproduces_generate(vit_gpt2_graphs, case):
    tensors = reference_tensors("vit-gpt2")
    prefix_ids = np.array(case["prefix_ids"], dtype=np.int64)
    got = vit_gpt2_graphs.greedy(tensors[case["pixel_values"]], prefix_ids, case["generate_kwargs"])
    expected = np.array(case["output_ids"])
    np.testing.assert_array_equal(pad_to(got, expected.shape[1], vit_gpt2_graphs.config["pad_token_id"]), expected)


# ---------------------------------------------------------------------------------------------
# Fixtures against their generators


def test_fixture_tokenizers_are_the_generated_ones():
    from tokenizers import Tokenizer

    assert learn_merges(CORPUS, 200) == learn_merges(CORPUS, 200)
    text = "a photo of a dog on the grass.\n"
    blip_tokenizer = blip2.tiny_processor().tokenizer
    saved = Tokenizer.from_file(str(BLIP2_DIR / "tokenizer.json"))
    assert saved.get_vocab_size() == len(blip_tokenizer)
    assert saved.encode(text).ids == blip_tokenizer(text)["input_ids"]
    assert saved.encode(text).ids[0] == blip_tokenizer.bos_token_id  # OPT's tokenizer prepends </s>
    assert saved.token_to_id("<image>") == manifest(BLIP2_DIR)["config"]["image_token_index"]
    gpt2 = gpt2_tokenizer()
    saved = Tokenizer.from_file(str(VIT_GPT2_DIR / "tokenizer.json"))
    assert saved.encode(text).ids == gpt2(text)["input_ids"]
    assert saved.decode(saved.encode(text).ids) == text


def test_preprocess_references_match_the_processors():
    index = json.loads((REFERENCE / "preprocess" / "index.json").read_text())
    tensors = load_file(str(REFERENCE / "preprocess" / "pixel_values.safetensors"))
    factories = {name: factory for name, (factory, _) in blip2.preprocess_processors().items()}
    errors = 0
    for entry in index["outputs"]:
        processor = factories[entry["processor"]](entry["backend"])
        file = next(i["file"] for i in index["images"] if i["name"] == entry["image"])
        image = test_images.load_image(REFERENCE / "preprocess", file)
        if entry["variant"] == "model_card_rgb":
            image = test_images.model_card_rgb(image)
        if "error" in entry:
            errors += 1
            with pytest.raises((ValueError, RuntimeError)):
                processor(image, return_tensors="pt")
            continue
        got = processor(image, return_tensors="pt")["pixel_values"].numpy()
        np.testing.assert_array_equal(got, tensors[entry["tensor"]], err_msg=entry["tensor"])
    # ViT's processor has no RGB conversion: grayscale, RGBA, 16-bit and CMYK input fail as loaded.
    assert errors == 2 * 4
    # The caption references were preprocessed exactly like these tensors.
    five = test_images.REFERENCE_BATCHES["five"]
    blip_batch = reference_tensors("blip2")["five.pixel_values"]
    vit_batch = reference_tensors("vit-gpt2")["five.pixel_values"]
    modes = {i["name"]: i["pil_mode"] for i in index["images"]}
    for row, name in enumerate(five):
        np.testing.assert_array_equal(blip_batch[row], tensors[f"blip2.torchvision.as_loaded.{name}"][0])
        variant = "as_loaded" if modes[name] == "RGB" else "model_card_rgb"
        np.testing.assert_array_equal(vit_batch[row], tensors[f"vit-gpt2.torchvision.{variant}.{name}"][0])


def test_test_images_cover_the_decoder_cases():
    index = json.loads((REFERENCE / "preprocess" / "index.json").read_text())
    modes = {i["pil_mode"] for i in index["images"]}
    assert {"RGB", "L", "RGBA", "I;16", "CMYK"} <= modes
    assert any(i["encoded_as"] == "RGB;16" for i in index["images"])
    sizes = {(i["width"], i["height"]) for i in index["images"]}
    assert any(w < 32 and h < 32 for w, h in sizes) and any(w < 32 < h for w, h in sizes)


@pytest.mark.skipif(os.environ.get("CIP_SLOW_TESTS") != "1", reason="regenerates every captioner fixture (~3 min); set CIP_SLOW_TESTS=1")
def test_fixtures_regenerate_byte_for_byte(tmp_path):
    blip2.make_fixture(tmp_path)
    vit_gpt2.make_fixture(tmp_path)
    for sub in ["blip2-tiny", "vit-gpt2-tiny", "reference/blip2", "reference/vit-gpt2", "reference/preprocess"]:
        committed = sorted(p.relative_to(FIXTURES / sub) for p in (FIXTURES / sub).rglob("*") if p.is_file())
        regenerated = sorted(p.relative_to(tmp_path / sub) for p in (tmp_path / sub).rglob("*") if p.is_file())
        assert committed == regenerated, sub
        for rel in committed:
            assert (FIXTURES / sub / rel).read_bytes() == (tmp_path / sub / rel).read_bytes(), f"{sub}/{rel}"


# ---------------------------------------------------------------------------------------------
# A user's own checkpoint


def test_export_of_a_users_saved_blip2(tmp_path):
    """A differently shaped BLIP-2 (3 query tokens, 3 layers, 6 heads, 24 px) saved with
    save_pretrained, exported through the CLI arguments, decodes like transformers' generate."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, Blip2Processor, OPTConfig)
    from cip_export.gpt2_tokenizer import opt_tokenizer

    tokenizer = opt_tokenizer(num_merges=60)
    processor = Blip2Processor(BlipImageProcessor(size={"height": 24, "width": 24}), tokenizer, num_query_tokens=3)
    text = OPTConfig(vocab_size=len(tokenizer) + 5, hidden_size=48, ffn_dim=96, num_hidden_layers=3,
                     num_attention_heads=6, max_position_embeddings=40, word_embed_proj_dim=48,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=24, patch_size=6).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, encoder_hidden_size=16).to_dict(),
        text_config=text.to_dict(), num_query_tokens=3,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(7)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.4)
    saved = tmp_path / "my-blip2"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)

    parser = argparse.ArgumentParser()
    blip2.add_arguments(parser)
    out = tmp_path / "exported"
    blip2.export(parser.parse_args(["--source", str(saved), "--out", str(out)]))

    m = manifest(out)
    assert m["source"] == str(saved)
    c = m["config"]
    assert (c["num_query_tokens"], c["num_layers"], c["num_heads"], c["head_dim"]) == (3, 3, 6, 8)
    assert c["vocab_size"] == len(tokenizer) + 5 and c["tokenizer_size"] == len(tokenizer)
    assert (c["image_height"], c["image_width"]) == (24, 24)
    graphs = Blip2Graphs(out)
    rng = np.random.default_rng(0)
    from PIL import Image
    images = [Image.fromarray(rng.integers(0, 256, (30 + 9 * i, 20, 3), dtype=np.uint8)) for i in range(2)]
    inputs = processor(images=images, text=["a photo of", "the"], padding=True, return_tensors="pt")
    kwargs = {"max_new_tokens": 6}
    with torch.no_grad():
        expected = model.generate(**inputs, **kwargs).numpy()
    got = graphs.greedy(inputs["pixel_values"].numpy(), inputs["input_ids"].numpy(),
                        inputs["attention_mask"].numpy(), kwargs)
    np.testing.assert_array_equal(pad_to(got, expected.shape[1], 1), expected)


def test_unsupported_checkpoints_are_refused(tmp_path):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(text_config={"model_type": "t5", "d_model": 16, "d_ff": 32, "num_layers": 1,
                                      "num_heads": 2, "d_kv": 8, "vocab_size": 50},
                         vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                         qformer_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "encoder_hidden_size": 16},
                         num_query_tokens=2, image_token_index=49)
    model = Blip2ForConditionalGeneration(config)
    with pytest.raises(ValueError, match="t5 language model is not supported"):
        blip2._check_supported(model)


def test_fp16_export_keeps_float32_at_the_edges(tmp_path):
    """--dtype fp16: pixel_values and logits stay float32, embeddings and caches are float16, and
    the logits agree with the float32 model within fp16 rounding."""
    processor = blip2.tiny_processor()
    model = blip2.tiny_model(processor)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    out = tmp_path / "fp16"
    blip2.export_blip2(saved, out, "fp16")
    m = manifest(out)
    assert m["dtype"] == "fp16"
    types = {(g, v["name"]): v["dtype"] for g, graph in m["graphs"].items()
             for v in graph["inputs"] + graph["outputs"]}
    assert types[("vision", "pixel_values")] == "float32" and types[("vision", "query_embeds")] == "float16"
    assert types[("decoder", "logits")] == "float32" and types[("decoder", "past_key_values.0.key")] == "float16"
    graphs = Blip2Graphs(out)
    tensors = reference_tensors("blip2")
    query = graphs.query_embeds(tensors["five.pixel_values"])
    assert query.dtype == np.float16
    scale = np.abs(tensors["five.query_embeds"]).max()
    assert np.abs(query.astype(np.float32) - tensors["five.query_embeds"]).max() < 0.03 * scale
    ids, mask = blip2.generate_prefix(model, processor, None, 5)
    ids, mask = ids.numpy(), mask.numpy()
    logits, present = graphs.step(graphs.prefix_embeds(ids, query), mask, initial_positions(mask), graphs.empty_past(5))
    expected = tensors["five.none.prefix_last_logits"]
    assert logits.dtype == np.float32 and present[0].dtype == np.float16
    assert np.abs(logits[:, -1] - expected).max() < 0.03 * np.abs(expected).max()


def test_large_graphs_keep_weights_in_external_data(tmp_path, monkeypatch):
    from cip_export import decoder_graphs

    monkeypatch.setattr(decoder_graphs, "EXTERNAL_DATA_THRESHOLD", 0)
    processor = blip2.tiny_processor()
    embedding = blip2.tiny_model(processor).language_model.get_input_embeddings()
    path = tmp_path / "embed" / "model.onnx"
    decoder_graphs.export_graph(blip2.TokenEmbedding(embedding).eval(), (torch.zeros(2, 3, dtype=torch.long),),
                                path, ["input_ids"], ["inputs_embeds"],
                                {"input_ids": ["batch", "sequence"], "inputs_embeds": ["batch", "sequence", 32]})
    assert (tmp_path / "embed" / "model.onnx.data").stat().st_size >= embedding.weight.numel() * 4
    assert path.stat().st_size < 4096
    session = ort.InferenceSession(str(path))
    assert session.get_inputs()[0].shape == ["batch", "sequence"]
    ids = np.array([[0, 5, len(processor.tokenizer) - 1]])
    np.testing.assert_array_equal(session.run(None, {"input_ids": ids})[0],
                                  embedding(torch.from_numpy(ids)).detach().numpy())


@pytest.mark.parametrize("module", [blip2, vit_gpt2], ids=["blip2", "vit-gpt2"])
def test_export_refuses_a_foreign_output_directory(tmp_path, module):
    keep = tmp_path / "notes.txt"
    keep.write_text("not a model")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    with pytest.raises(ValueError, match="is not empty and holds no cip-model.toml"):
        module.export(parser.parse_args(["--source", str(tmp_path / "missing"), "--out", str(tmp_path)]))
    assert keep.read_text() == "not a model"
