"""Hugging Face causal LMs behind memloc's layers: tiny GPT-2, GPT-NeoX and Llama configs, CPU, no downloads.

The expected module names below are the ground truth the wrapper must find on its own (it has no such table).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from memloc.core.errors import ConfigError
from memloc.core.files import load_into, load_state, save_state
from memloc.core.units import UnitMasks
from memloc.tasks.classification.models import layers
from memloc.tasks.lm.gpt import GPT, GPTShape

transformers = pytest.importorskip("transformers")
from memloc.tasks.lm.hf import HFCausalLM, build_hf, load_hf  # noqa: E402

FAMILIES = ("gpt2", "gpt_neox", "llama")
TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)
EXTRA = {"gpt2": {}, "gpt_neox": {}, "llama": {"intermediate": 88, "n_kv_head": 2}}  # SwiGLU width not 4 x 32
WIDTH = {"gpt2": 128, "gpt_neox": 128, "llama": 88}
BLOCK = {"gpt2": "transformer.h.{i}", "gpt_neox": "gpt_neox.layers.{i}", "llama": "model.layers.{i}"}
O_PROJ = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense", "llama": "self_attn.o_proj"}
DOWN = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", "llama": "mlp.down_proj"}
ATTN_PARTS = {"gpt2": ("ln_1", "attn"), "gpt_neox": ("input_layernorm", "attention"),
              "llama": ("input_layernorm", "self_attn")}
MLP_PARTS = {"gpt2": ("ln_2", "mlp"), "gpt_neox": ("post_attention_layernorm", "mlp"),
             "llama": ("post_attention_layernorm", "mlp")}
NAMES = ["embed", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "head"]
KINDS = ["embedding", "attention", "mlp", "attention", "mlp", "unembedding"]


def tiny_config(family: str):
    """The config build_hf makes, written out: what a user's saved folder would hold (GPT-2 ties its head)."""
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=64, n_positions=32, n_layer=2, n_head=4, n_embd=32,
                                       bos_token_id=63, eos_token_id=63)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=64, max_position_embeddings=32, num_hidden_layers=2,
                                          num_attention_heads=4, hidden_size=32, intermediate_size=128)
    return transformers.LlamaConfig(vocab_size=64, max_position_embeddings=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=88)


def wrapped(family: str, seed: int = 0) -> HFCausalLM:
    return build_hf(family, **TINY, **EXTRA[family], seed=seed).eval()


def raw_twin(model: HFCausalLM):
    """A plain transformers model with the wrapped model's weights, under their original names."""
    raw = transformers.AutoModelForCausalLM.from_config(model.hf.config)
    raw.load_state_dict(model.inner_state_dict())
    return raw.eval()


def logits_of(raw):
    return lambda ids: raw(input_ids=ids, use_cache=False).logits


IDS = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))  # (B, T)


@contextlib.contextmanager
def zeroed_input(module: torch.nn.Module, keep: torch.Tensor):
    """A pre-hook multiplying `module`'s first input (positional or hidden_states) by `keep` (width,)."""
    def hook(m, args, kwargs):
        if args:
            return (args[0] * keep, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * keep}
    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


def masked_logits(model, layer, unit: int) -> torch.Tensor:
    masks = UnitMasks(model, [layer])
    rows = torch.ones(IDS.shape[0], layer.units)
    rows[:, unit] = 0
    with masks.installed(), torch.no_grad():
        masks.set_rows(rows)
        return model(IDS)


def check_zeroing(model, ref, ref_modules: dict[str, torch.nn.Module], *, head_dim: int) -> None:
    """Zeroing unit u of each kind through UnitMasks == zeroing it by hand in the input of the module that
    consumes it (the first block, the output projection, the down projection) of the reference `ref`."""
    by_name = {l.name: l for l in layers(model)}
    with torch.no_grad():
        base = ref(IDS)
    for name, unit in (("embed", 5), ("blocks.1.attn", 2), ("blocks.0.mlp", 7), ("blocks.1.mlp", 61)):
        layer = by_name[name]
        width = layer.units * (head_dim if layer.kind == "attention" else 1)
        keep = torch.ones(width)
        step = head_dim if layer.kind == "attention" else 1
        keep[unit * step:(unit + 1) * step] = 0  # a head is head_dim consecutive features of the projection input
        with zeroed_input(ref_modules[name], keep), torch.no_grad():
            manual = ref(IDS)
        edited = masked_logits(model, layer, unit)
        assert not torch.equal(edited, base), name
        assert torch.equal(edited, manual), name


# ----------------------------------------------------------------------------- per family

@pytest.mark.parametrize("family", FAMILIES)
def test_layers_names_kinds_units(family):
    model = wrapped(family)
    got = layers(model)
    assert [l.name for l in got] == NAMES
    assert [l.kind for l in got] == KINDS
    assert [l.units for l in got] == [32, 4, WIDTH[family], 4, WIDTH[family], 64]
    assert [l.unit_dim for l in got] == [-1, -2, -1, -2, -1, -1]
    s = model.shape
    assert (s.block_size, s.vocab_size, s.n_head, s.intermediate) == (32, 64, 4, WIDTH[family])
    assert model.input_shape == (32,)
    b = "hf." + BLOCK[family].format(i=1)
    assert got[3].output == f"{b}.{O_PROJ[family]}.tap" and got[4].output == f"{b}.{DOWN[family]}.tap"
    assert got[3].modules == tuple(f"{b}.{p}" for p in ATTN_PARTS[family])
    assert got[4].modules == tuple(f"{b}.{p}" for p in MLP_PARTS[family])
    # every parameter belongs to exactly one layer (GPT-2's tied head is untied)
    params = [p for l in got for p in l.params]
    assert sorted(params) == sorted(n for n, _ in model.named_parameters())
    assert sum(l.num_params for l in got) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_taps_are_identities(family):
    model = wrapped(family)
    with torch.no_grad():
        assert torch.equal(model(IDS), logits_of(raw_twin(model))(IDS))
    assert model(IDS).dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_the_wrapper_computes_in_the_arithmetic_in_force(family):
    """Under bf16 arithmetic the wrapper runs the plain model under bf16 autocast (its logits bf16, what the plain
    model gives under autocast), the weights stay float32, and an edit made in place between two passes is seen by
    the second (nothing cached across passes); under fp32 it is the plain model exactly."""
    from memloc.core.precision import Arithmetic, arithmetic
    model = wrapped(family).eval()
    raw = raw_twin(model)
    with torch.no_grad():
        fp32 = model(IDS)
        with arithmetic(Arithmetic(bf16=True, channels_last=False)):
            got = model(IDS)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                want = logits_of(raw)(IDS)
            assert got.dtype == torch.bfloat16 and torch.equal(got, want)
            assert all(p.dtype == torch.float32 for p in model.parameters())
            down = model.mlp_down(0)
            down.weight.mul_(0)  # an edit between passes
            edited = model(IDS)
        with arithmetic(Arithmetic(bf16=False, channels_last=False)):
            assert torch.equal(model(IDS), logits_of(raw_twin(model))(IDS))
    assert not torch.equal(edited, got)
    assert (got.float() - fp32).abs().max() < 0.05 * fp32.abs().max()  # bf16 rounding, not another model


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_units_matches_manual_hooks(family):
    model = wrapped(family)
    raw = raw_twin(model)
    block = BLOCK[family]
    mods = {"embed": raw.get_submodule(block.format(i=0)),
            "blocks.1.attn": raw.get_submodule(f"{block.format(i=1)}.{O_PROJ[family]}"),
            "blocks.0.mlp": raw.get_submodule(f"{block.format(i=0)}.{DOWN[family]}"),
            "blocks.1.mlp": raw.get_submodule(f"{block.format(i=1)}.{DOWN[family]}")}
    check_zeroing(model, logits_of(raw), mods, head_dim=8)
    with torch.no_grad():
        assert torch.equal(model(IDS), logits_of(raw)(IDS))  # the hooks are gone


@pytest.mark.parametrize("family", FAMILIES)
def test_rewinding_a_layer_touches_only_its_part(family):
    model = wrapped(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # state_dict() holds the live tensors
    theirs = {k: v + 1 for k, v in before.items()}  # an "earlier" state differing everywhere (biases init to 0)
    for layer in layers(model)[3:5]:  # block 1's attention, then its MLP
        parts = ATTN_PARTS[family] if layer.kind == "attention" else MLP_PARTS[family]
        prefixes = tuple(f"hf.{BLOCK[family].format(i=1)}.{p}." for p in parts)
        assert sorted(layer.params) == sorted(k for k in before if k.startswith(prefixes))
        model.load_state_dict(before)
        model.load_state_dict({k: theirs[k] for k in layer.params}, strict=False)
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == set(layer.params)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_round_trips_through_safetensors(family, tmp_path):
    model = wrapped(family)
    save_state(tmp_path / "model.safetensors", model.state_dict())
    fresh = wrapped(family, seed=1)
    with torch.no_grad():
        assert not torch.equal(fresh(IDS), model(IDS))
        load_into(fresh, load_state(tmp_path / "model.safetensors"), source="test")
        assert torch.equal(fresh(IDS), model(IDS))


@pytest.mark.parametrize("family", FAMILIES)
def test_load_hf_reads_a_saved_folder(family, tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        raw = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    raw.save_pretrained(tmp_path)
    model = load_hf(tmp_path).eval()
    with torch.no_grad():
        expected = logits_of(raw)(IDS)
        assert torch.equal(model(IDS), expected)
    assert model.tied_keys == ({"lm_head.weight": "transformer.wte.weight"} if family == "gpt2" else {})
    assert [l.name for l in layers(model)] == NAMES
    # a plain model's state (original names; a tied head stored once, as GPT-2's checkpoints do) into a fresh wrapper
    fresh = HFCausalLM(transformers.AutoModelForCausalLM.from_config(tiny_config(family))).eval()
    fresh.load_inner_state_dict({k: v for k, v in raw.state_dict().items() if k not in model.tied_keys})
    with torch.no_grad():
        assert torch.equal(fresh(IDS), expected)


# ----------------------------------------------------------------------------- errors and the reference GPT

def test_load_hf_errors_are_one_line(tmp_path):
    cases = [("EleutherAI/pythia-70m", "never downloads"), (tmp_path, "config.json")]
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "no_weights")
    cases.append((tmp_path / "no_weights", "no weights"))
    for path, words in cases:
        with pytest.raises(ConfigError) as err:
            load_hf(path)
        msg = str(err.value)
        assert words in msg and "\n" not in msg
        if path != "EleutherAI/pythia-70m":
            assert str(path) in msg
    with pytest.raises(ConfigError, match="unknown Hugging Face family"):
        build_hf("bert", **TINY, seed=0)
    with pytest.raises(ConfigError, match="block size"):
        wrapped("llama")(torch.zeros(1, 33, dtype=torch.long))


def test_reference_gpt_has_the_same_layers_and_units():
    torch.manual_seed(0)
    gpt = GPT(GPTShape(**TINY)).eval()
    got = layers(gpt)
    assert [l.name for l in got] == NAMES and [l.kind for l in got] == KINDS
    assert [l.name for l in got] == [l.name for l in layers(wrapped("gpt2"))]
    assert [l.units for l in got] == [32, 4, 128, 4, 128, 64]
    mods = {"embed": gpt.blocks[0], "blocks.1.attn": gpt.blocks[1].attn.proj, "blocks.0.mlp": gpt.blocks[0].mlp.proj,
            "blocks.1.mlp": gpt.blocks[1].mlp.proj}
    check_zeroing(gpt, gpt, mods, head_dim=8)
