"""Tied weights are not missing: a key the checkpoint lacks that is the same tensor as a loaded
key was loaded (issue 21 item 10), on hand-made ties and real ``transformers`` models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import torchkeep


class _TiedLM(torch.nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.embed.weight


def _without(state: dict, *drop: str) -> dict:
    return {k: v for k, v in state.items() if k not in drop}


@pytest.mark.parametrize("kind", ["mapping", "safetensors", "tk"])
@pytest.mark.parametrize("dropped", ["head.weight", "embed.weight"])
def test_hand_made_tie_not_missing(tmp_path, kind: str, dropped: str) -> None:
    src = _TiedLM()
    state = _without(dict(src.state_dict()), dropped)
    source: object = state
    if kind != "mapping":
        source = str(tmp_path / f"w.{kind}")
        (save_file if kind == "safetensors" else torchkeep.save)(state, source)
    dst = _TiedLM()
    report = torchkeep.load_state_dict(dst, source)  # strict: must not raise
    assert report.ok and report.missing == []
    other = "embed.weight" if dropped == "head.weight" else "head.weight"
    assert report.tied == [(dropped, other)]
    assert any("tied" in note for note in report.notes)
    assert "same tensor as" in str(report)
    assert torch.equal(dst.head.weight, src.embed.weight)


def test_untied_model_still_reports_missing() -> None:
    state = _without(dict(_TiedLM(tie=False).state_dict()), "head.weight")
    report = torchkeep.load_state_dict(_TiedLM(tie=False), state, strict=False)
    assert report.missing == ["head.weight"] and report.tied == []
    with pytest.raises(torchkeep.StateDictMismatchError):
        torchkeep.load_state_dict(_TiedLM(tie=False), state)


def test_tie_to_a_key_that_did_not_load_is_missing() -> None:
    """A shape mismatch on the embedding means its tied head did not load either."""
    state = {"embed.weight": torch.zeros(3, 4), "body.weight": torch.zeros(4, 4),
             "body.bias": torch.zeros(4)}  # fmt: skip
    report = torchkeep.load_state_dict(_TiedLM(), state, strict=False)
    assert "head.weight" in report.missing and report.tied == []


transformers = pytest.importorskip("transformers")


def _gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("build", [_gpt2, _llama])
def test_transformers_save_pretrained_loads_strict(tmp_path, build) -> None:
    torch.manual_seed(0)
    src = build()
    src.save_pretrained(str(tmp_path / "hf"))
    assert "lm_head.weight" not in torchkeep.load(str(tmp_path / "hf" / "model.safetensors"))
    dst = build()
    report = torchkeep.load_state_dict(dst, str(tmp_path / "hf" / "model.safetensors"))
    assert report.ok and [k for k, _ in report.tied] == ["lm_head.weight"]
    for (name, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(src.eval()(ids).logits, dst.eval()(ids).logits)


def test_transformers_meta_model_assign_keeps_tie(tmp_path) -> None:
    torch.manual_seed(0)
    src = _gpt2()
    src.save_pretrained(str(tmp_path / "hf"))
    with torch.device("meta"):
        dst = _gpt2()
    report = torchkeep.load_state_dict(dst, str(tmp_path / "hf" / "model.safetensors"), assign=True)
    assert report.ok and report.tied
    assert dst.lm_head.weight is dst.transformer.wte.weight
    assert dst.lm_head.weight.device.type == "cpu"
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(src.eval()(ids).logits, dst.eval()(ids).logits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_transformers_gpu_saved_bin_into_cpu_model(tmp_path) -> None:
    """A ``pytorch_model.bin`` written on a GPU (storages say ``cuda:0``), lm_head left out as
    ``save_pretrained`` does, loads strictly into a CPU model."""
    from test_realworld_loading import _save_as_cuda

    torch.manual_seed(0)
    src = _llama()
    state = {k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}
    path = str(tmp_path / "pytorch_model.bin")
    _save_as_cuda(state, path)
    dst = _llama()
    report = torchkeep.load_state_dict(dst, path)
    assert report.ok and [k for k, _ in report.tied] == ["lm_head.weight"]
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(src.eval()(ids).logits, dst.eval()(ids).logits)
