"""Whole Hugging Face transformers models (built from tiny configs, no downloads) round-trip
through save_model/load_model: same outputs, same state dict, equal config, ties kept."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchkeep

transformers = pytest.importorskip("transformers")


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def _olmo():
    """A Llama-type decoder (rotary, SwiGLU, grouped heads) without kernels' wrappers."""
    cfg = transformers.OlmoConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.OlmoForCausalLM(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("build", [_gpt2, _bert, _olmo], ids=["gpt2", "bert", "olmo"])
def test_transformers_model_round_trip(build, tmp_path) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build().eval()
    path = tmp_path / "m.tk"
    torchkeep.save_model(model, path)
    loaded = torchkeep.load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        want, got = model(ids), loaded(ids)
    assert torch.equal(want.logits, got.logits)
    _same_state(model, loaded)
    assert type(loaded.config) is type(model.config)
    assert loaded.config == model.config
    assert loaded.config.to_dict() == model.config.to_dict()
    base = loaded.base_model
    assert base.config is loaded.config  # one object, as in the original
    loaded.config.output_hidden_states = True  # still a working config after rebuild
    with torch.no_grad():
        assert loaded(ids).hidden_states is not None
    # Loads as weights too, into a fresh model built from the loaded config.
    fresh = type(model)(loaded.config)
    report = torchkeep.load_state_dict(fresh, path, strict=False)
    assert not report.unexpected


@pytest.mark.parametrize("build", [_gpt2, _olmo], ids=["gpt2", "olmo"])
def test_tied_lm_head_stays_tied(build, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb
    torchkeep.save_model(model, tmp_path / "m.tk")
    loaded = torchkeep.load_model(tmp_path / "m.tk")
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    with torch.no_grad():
        loaded.lm_head.weight.add_(1.0)
    assert torch.equal(loaded.get_input_embeddings().weight, loaded.lm_head.weight)


def test_config_class_must_be_allowed(tmp_path) -> None:
    """The config's class resolves through the same allow-list as the module classes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _gpt2()
    path = tmp_path / "m.tk"
    torchkeep.save_model(model, path)
    entry = torchkeep.load(path)["__torchkeep_model__"]
    assert entry["version"] == 2
    names = {item["class"] for item in entry["objects"]}
    assert "transformers.models.gpt2.configuration_gpt2:GPT2Config" in names
    assert "config" in entry["root"]["values"]


def test_llama_with_kernel_wrappers(tmp_path) -> None:
    """With the ``kernels`` package (a transformers dependency) Llama attention layers keep
    per-instance wrapper modules (``_kernel_funcs``) whose class is made inside a function; they
    are stored as the class of the module-level wrapper and rebuilt without running its code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _llama().eval()
    torchkeep.save_model(model, tmp_path / "m.tk")
    loaded = torchkeep.load_model(tmp_path / "m.tk")
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    _same_state(model, loaded)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    funcs = model.model.layers[0].self_attn.__dict__.get("_kernel_funcs")
    if funcs:  # each layer has its own wrapper again, of the same class
        again = loaded.model.layers[0].self_attn._kernel_funcs
        assert {k: type(v) for k, v in again.items()} == {k: type(v) for k, v in funcs.items()}
        assert again is not loaded.model.layers[1].self_attn._kernel_funcs
