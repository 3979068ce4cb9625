"""PEFT-only references for the exactness tests (import with sys.path, as synthetic_lora).

- ``peft_with``: PEFT with the named adapters all active;
- ``peft_scaled``: ... each adapter's scaling multiplied by its weight (the plain-LoRA reference);
- ``peft_layerwise_mixture``: every PEFT LoRA layer computes base(x) + sum_e c_e (layer_e(x) - base(x)),
  layer_e being PEFT's own forward with adapter e alone: the reference for DoRA experts, whose
  all-active PEFT forward is no mixture (each rescaling reads the running sum before it); for plain
  LoRA it equals ``peft_scaled``.
"""

from __future__ import annotations

import copy

from peft import PeftModel
from peft.tuners.lora import LoraLayer


def outputs(model, ids, mask):
    """The tensors to compare: logits, or BERT's last hidden state and pooler output."""
    result = model(input_ids=ids, attention_mask=mask)
    if hasattr(result, "logits"):
        return (result.logits,)
    return (result.last_hidden_state, result.pooler_output)


def peft_with(base, dirs, names):
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    model.base_model.set_adapter(list(names))
    return model.eval()


def peft_scaled(base, dirs, weights):
    """PEFT, adapters all active, each adapter's scaling multiplied by its weight."""
    model = peft_with(base, dirs, list(weights))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, factor in weights.items():
                if name in module.scaling:
                    module.scaling[name] *= factor
    return model


def peft_layerwise_mixture(base, dirs, weights):
    """Every PEFT LoRA layer computes base(x) + sum_e c_e (layer_e(x) - base(x)), layer_e being
    PEFT's own forward with adapter e alone."""
    model = peft_with(base, dirs, list(weights))
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        single = module.forward

        def mixed(x, *args, _module=module, _single=single, **kwargs):
            base_out = _module.base_layer(x, *args, **kwargs)
            out = base_out
            for name, weight in weights.items():
                if name in _module.lora_A or name in _module.lora_embedding_A:
                    _module.set_adapter(name)
                    out = out + weight * (_single(x, *args, **kwargs) - base_out)
            return out

        module.forward = mixed
    return model
