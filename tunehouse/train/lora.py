"""PEFT LoRA wiring: target modules, wrap, parameter counts, merge, adapters-off context.

    base (frozen W) ──▶ W·x + (alpha/r) · B·A·x ◀── A [r × in], B [out × r] trained (B starts at 0)
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunehouse.atomic import atomic_dir


def target_modules(model: nn.Module, spec: str) -> list[str]:
    """Module-name suffixes to adapt: "all-linear" = every nn.Linear except the LM head.

    A comma list ("q_proj,v_proj") is taken as given but must name at least one nn.Linear.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and module is not head}
    if spec == "all-linear":
        return sorted(linear)
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    missing = [name for name in wanted if name not in linear]
    if missing:
        raise ValueError(f"lora_trainable_modules names no linear layer: {', '.join(missing)} "
                         f"(linear layers: {', '.join(sorted(linear))})")
    return wanted


def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, modules: str,
             base_name: str | None = None):
    """Wrap `model` in a fresh PEFT LoRA adapter (default PEFT init: A Kaiming, B zero)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=target_modules(model, modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if base_name:  # recorded in adapter_config.json instead of the local folder it came from
        peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def load_lora(model: nn.Module, adapter_dir: Path, *, r: int | None = None, trainable: bool = True):
    """Attach an existing adapter (for continued training: `r` must match when given)."""
    from peft import PeftConfig, PeftModel

    found = PeftConfig.from_pretrained(str(adapter_dir))
    if r is not None and found.r != r:
        raise ValueError(f"adapter in {adapter_dir} has r={found.r}, the job asks for r={r}; "
                         "continue from its merged model instead")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def lean_forward(peft_model: nn.Module) -> int:
    """Give every PEFT LoRA linear layer of `peft_model` a leaner training forward; the count.

        y = addmm(W·x + b, A·dropout(x), Bᵀ, alpha=scaling)

    is PEFT's `W·x + B·A·x · scaling` with the scale and the add fused into one matmul, and
    without PEFT's casts of x to the adapter's dtype and back (under bf16 autocast they cost two
    copies of every layer input, forward and backward). Anything else (adapters disabled or
    merged, several active adapters, DoRA and other variants, extra arguments) takes PEFT's own
    forward, so disabling adapters, switching to a reference adapter and merging behave as before.
    """
    from peft.tuners.lora.layer import Linear

    n = 0
    for module in peft_model.modules():
        if type(module) is Linear:  # subclasses (quantised layers) keep their own forward
            module.forward = types.MethodType(_lean_lora_forward, module)
            n += 1
    return n


def _lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant):
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    y = F.linear(x, base.weight, base.bias)
    h = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight)
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]).to(y.dtype),
                      self.lora_B[name].weight.t().to(y.dtype), alpha=self.scaling[name])
    return out.view(y.shape)


def restore_base_weights(peft_model: nn.Module) -> int:
    """Put the base model's original weights back where training stored them in a lower
    precision (bf16 frozen weights, `precision.store_frozen_in`), read again from the folder the
    base came from, so the merged model is base (fp32) + adapter as with fp32 training; a no-op
    when the base is already fp32. Returns how many tensors were restored."""
    from transformers import AutoModelForCausalLM

    base = peft_model.get_base_model()
    low = {name for name, p in base.named_parameters() if p.is_floating_point() and p.dtype != torch.float32
           and ".lora_" not in name}
    if not low:
        return 0
    original = AutoModelForCausalLM.from_pretrained(base.name_or_path, dtype=torch.float32).state_dict()
    n = 0
    for name, p in base.named_parameters():
        if name in low:
            p.data = original[name.replace(".base_layer.", ".")].to(p.device)
            n += 1
    return n


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def merge(peft_model) -> nn.Module:
    """Fold the adapter into the base weights and return the plain transformers model."""
    return peft_model.merge_and_unload()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model without its LoRA deltas (the DPO reference).

    A model without adapters raises: full fine-tuning needs a frozen copy as its reference, and
    silently running the trained model as "reference" would zero every DPO log-ratio.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError("adapters_disabled needs a PEFT model; full fine-tuning uses a frozen copy")
    with model.disable_adapter():
        yield


def merge_adapter_folder(base_path: Path, adapter_dir: Path, dest: Path) -> Path:
    """Write base + adapter, merged, as a plain model folder at `dest` (atomically); return it.

    The tokenizer is taken from the adapter folder when it carries one (tunehouse checkpoints
    do), else from the base.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = merge(load_lora(base, adapter_dir, trainable=False))
    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base_path)
    with atomic_dir(dest) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest
