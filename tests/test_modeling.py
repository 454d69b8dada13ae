"""Scoring and sampling helpers: padding invariance, cache-sampling equals HF generate, hub loading."""

import json

import torch

from rlhf.batching import forward_logits, left_pad
from rlhf.models import build_llama, load_causal_lm
from rlhf.sampling import sample_tokens
from rlhf.tokenization import encode_prompt, train_tokenizer

TEXTS = ["<|user|>What is 2 + 2?<|assistant|>4.", "The zib is red. The mek is blue."] * 20


def tiny_model():
    tok = train_tokenizer(TEXTS, 300)
    model = build_llama(tok, hidden=32, layers=2, heads=2, intermediate=64, max_len=64, seed=0).eval()
    return tok, model


def test_tokenizer_special_tokens_and_template():
    tok, _ = tiny_model()
    assert tok.pad_token_id != tok.eos_token_id
    ids = encode_prompt(tok, "hi")
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"


def test_left_padded_logits_equal_unpadded():
    tok, model = tiny_model()
    short, long = encode_prompt(tok, "hi"), encode_prompt(tok, "What is the colour of the zib today?")
    ids, mask = left_pad([short, long], tok.pad_token_id)
    with torch.no_grad():
        batched = forward_logits(model, ids, mask)
        alone = model(input_ids=torch.tensor([short])).logits
    assert torch.allclose(batched[0, -len(short):], alone[0], atol=1e-5)


def test_greedy_cache_sampling_matches_hf_generate():
    tok, model = tiny_model()
    queries = [encode_prompt(tok, "hi"), encode_prompt(tok, "What is 2 + 2?")]
    ours = sample_tokens(model, queries, pad_id=tok.pad_token_id, eos_id=-1, max_new_tokens=8, temperature=0.0,
                         generator=None, device=torch.device("cpu"))
    for i, q in enumerate(queries):
        ref = model.generate(torch.tensor([q]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)
        assert ours[i].tolist() == ref[0, len(q):].tolist()


def test_sampling_is_reproducible_from_the_generator():
    tok, model = tiny_model()
    q = [encode_prompt(tok, "hi")] * 4
    a, b = (sample_tokens(model, q, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=6,
                          temperature=1.0, generator=torch.Generator().manual_seed(3), device=torch.device("cpu"))
            for _ in range(2))
    assert torch.equal(a, b)


def test_pretrain_takes_a_local_hf_folder_and_adds_a_distinct_pad(tmp_path):
    """`pretrain.base_model` as a local folder: the real hub-loading path, offline."""
    import dataclasses

    from stages.pretrain import run
    from tests.conftest import tiny_params

    tok, model = tiny_model()
    # A folder like many hub models: PAD missing (so it would default to EOS) and no chat template.
    tok.pad_token = None
    tok.chat_template = None
    model.config.pad_token_id = None
    src = tmp_path / "hub-model"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    params = dataclasses.replace(tiny_params("pretrain"), base_model=str(src))
    m = run(params, corpus=tmp_path / "unused.jsonl", out=tmp_path / "base", metrics=tmp_path / "m.json",
            plots=tmp_path / "plots", checkpoints=None)
    assert m["source"] == str(src)
    assert "source" not in json.loads((tmp_path / "m.json").read_text())  # a setting, not a measurement
    loaded = load_causal_lm(tmp_path / "base")
    from rlhf.models import load_tokenizer

    tok2 = load_tokenizer(tmp_path / "base")
    assert tok2.pad_token_id != tok2.eos_token_id and tok2.chat_template
    assert loaded.get_input_embeddings().weight.shape[0] >= len(tok2)


def test_missing_or_unsafe_model_folder_is_a_clear_error(tmp_path):
    import pytest

    from rlhf.errors import StageError

    with pytest.raises(StageError, match="folder not found"):
        load_causal_lm(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    (tmp_path / "m/config.json").write_text("{}")
    with pytest.raises(StageError, match="safetensors"):
        load_causal_lm(tmp_path / "m")


def test_setup_torch_on_cuda_turns_off_cudnn_attention_and_turns_on_tf32():
    """The flags are process-wide and settable on a CPU build, so the CUDA branch runs here too."""
    from rlhf.devices import setup_torch

    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32, torch.get_num_threads())
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        setup_torch(1, torch.device("cuda"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.enable_cudnn_sdp(True)
        setup_torch(1, torch.device("cpu"))
        assert torch.backends.cuda.cudnn_sdp_enabled()  # CPU runs leave the CUDA flags alone
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]
        torch.backends.cudnn.allow_tf32 = before[2]
        torch.set_num_threads(before[3])


def tiny_gpt2(tok, positions: int = 16):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=16, n_layer=1, n_head=2,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return GPT2LMHeadModel(config).eval()


def test_position_limit_and_left_truncation():
    import pytest

    from rlhf.errors import StageError
    from rlhf.lengths import fit_example, fit_prompt, length_tally, position_limit, prompt_budget

    tok, llama = tiny_model()
    assert position_limit(llama) == 64 and position_limit(tiny_gpt2(tok, 16)) == 16  # GPT-2: n_positions
    assert position_limit({"n_ctx": 8}) == 8 and position_limit({}) is None
    assert fit_prompt([0, 1, 2, 3, 4, 5], 3) == [0, 4, 5]  # the first token (BOS) and the end are kept
    tally = length_tally()
    assert fit_example([0, 1, 2, 3], [7, 8], 4) == ([0, 3], [7, 8])
    assert fit_example([0, 1], [7, 8, 9, 10], 4) is None  # the response alone leaves no room: dropped
    assert tally.metrics() == {"position_limit": 4, "prompts_truncated": 1, "records_dropped": 0}
    with pytest.raises(StageError, match="max_new_tokens=16 leaves no room for a prompt in the model's 16 positions"):
        prompt_budget(tiny_gpt2(tok, 16), 16)


def test_gpt2_samples_and_scores_past_its_position_limit():
    """A learned-position model (GPT-2) indexes out of range past n_positions: prompts are cut, never crash."""
    from rlhf.batching import continuation_loglik
    from rlhf.lengths import length_tally

    tok, _ = tiny_model()
    model = tiny_gpt2(tok, 16)
    long = encode_prompt(tok, "What is the colour of the zib today? " * 4)
    assert len(long) > 16
    tally = length_tally()
    out = sample_tokens(model, [long, encode_prompt(tok, "hi")], pad_id=tok.pad_token_id, eos_id=-1, max_new_tokens=6,
                        temperature=0.0, generator=None, device=torch.device("cpu"))
    assert out.shape == (2, 6) and tally.truncated == 1
    lls = continuation_loglik(model, tok, [(long, long[:5]), (long[:3], long[3:8])], batch_size=2,
                              device=torch.device("cpu"))
    assert len(lls) == 2 and tally.truncated == 2
    # A pair that fits in limit + 1 tokens is scored whole: the last token is never fed to the model.
    ctx, cont = long[:10], long[10:17]
    with torch.no_grad():
        alone = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0], -1)
    want = sum(float(alone[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert abs(continuation_loglik(model, tok, [(ctx, cont)], batch_size=1, device=torch.device("cpu"))[0] - want) < 1e-4


def test_pretrain_continues_a_local_base_model_on_the_corpus(tmp_path):
    """`pretrain.continue_on_corpus`: a GPT-2 folder (learned positions, 32 of them) is trained further on the
    corpus with its own tokenizer; blocks are capped at its position limit and the corpus loss falls."""
    import dataclasses

    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.models import load_tokenizer
    from rlhf.training import masked_lm_loss
    from stages.pretrain import pack_blocks, run
    from tests.conftest import tiny_params

    docs = [f"The zib number {i % 7} is red. The mek is blue." for i in range(200)]
    tok = train_tokenizer(docs + TEXTS, 300)
    config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(src)
    tok.save_pretrained(src)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    params = dataclasses.replace(tiny_params("pretrain"), base_model=str(src), continue_on_corpus=True, seq_len=48,
                                 max_steps=8, warmup_steps=1, checkpoint_every=0, eval_every=4)
    m = run(params, corpus=tmp_path / "corpus.jsonl", out=tmp_path / "base", metrics=tmp_path / "m.json",
            plots=tmp_path / "plots", checkpoints=tmp_path / "ckpt")
    assert m["source"] == str(src) and m["continued_on_corpus"] and m["trained_steps"] == 8
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert "source" not in on_disk and on_disk["val_loss"] == m["val_loss"]
    assert list((tmp_path / "plots").rglob("*.tsv"))

    out_tok = load_tokenizer(tmp_path / "base")
    assert out_tok.get_vocab() == load_tokenizer(src).get_vocab()  # the base's tokenizer, not a new one
    before, after = load_causal_lm(src), load_causal_lm(tmp_path / "base")
    assert after.config.model_type == "gpt2" and after.config.n_positions == 32
    blocks = pack_blocks(out_tok, docs[:40], 32)  # 32: the cap at the model's positions

    def loss(model) -> float:
        with torch.no_grad():
            return float(masked_lm_loss(model(input_ids=blocks).logits, blocks))

    assert loss(after) < loss(before) - 0.5
